import pytest

from filters.url import url_reason


@pytest.mark.parametrize("url,reason", [
    ("https://example.org/a.jpg", None),
    ("http://images.example.com:8080/x.png?size=2", None),
    ("", "empty_url"),
    ("   ", "empty_url"),
    (None, "empty_url"),
    ("ftp://example.org/a.jpg", "unsupported_scheme"),
    ("file:///etc/passwd", "unsupported_scheme"),
    ("data:image/png;base64,AAAA", "unsupported_scheme"),
    ("example.org/a.jpg", "malformed_url"),
    ("http://", "malformed_url"),
    ("http://exa mple.org/a.jpg", "malformed_url"),
    ("http://example.org:99999/a.jpg", "malformed_url"),
    ("http://localhost/a.jpg", "blocked_address"),
    ("http://foo.localhost/a.jpg", "blocked_address"),
    ("http://127.0.0.1:8000/a.jpg", "blocked_address"),
    ("http://10.1.2.3/a.jpg", "blocked_address"),
    ("http://172.16.0.1/a.jpg", "blocked_address"),
    ("http://192.168.1.1/a.jpg", "blocked_address"),
    ("http://169.254.169.254/latest/meta-data/", "blocked_address"),  # cloud metadata endpoint
    ("http://0.0.0.0/", "blocked_address"),
    ("http://[::1]/a.jpg", "blocked_address"),
    ("http://[fe80::1]/a.jpg", "blocked_address"),
    ("http://[::ffff:127.0.0.1]/a.jpg", "blocked_address"),
    ("http://2130706433/a.jpg", "blocked_address"),  # 127.0.0.1 as one decimal number
    ("http://0x7f.1/a.jpg", "blocked_address"),
    ("http://240.0.0.1/a.jpg", "blocked_address"),  # reserved
    ("http://8.8.8.8/a.jpg", None),
    ("http://[2606:4700::1111]/a.jpg", None),
])
def test_url_reason(url, reason) -> None:
    assert url_reason(url) == reason


def test_private_networks_allowed_on_request() -> None:
    assert url_reason("http://127.0.0.1:8000/a.jpg", allow_private_networks=True) is None
    assert url_reason("ftp://127.0.0.1/a.jpg", allow_private_networks=True) == "unsupported_scheme"
