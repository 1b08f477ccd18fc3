import pytest

from filters.url import url_reason
from filters.web.address import AddressPolicy


@pytest.mark.parametrize("url,reason", [
    ("https://example.org/a.jpg", None),
    ("http://images.example.com:8080/x.png?size=2", None),
    ("http://bücher.example/bild.jpg", None),  # an IRI: IDNA-encoded and percent-encoded on fetch
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
    ("http://%31%32%37.0.0.1:8000/a.jpg", "blocked_address"),  # percent-encoded 127
    ("http://%31%36%39.254.169.254/latest/meta-data/", "blocked_address"),
    ("http://10.1.2.3/a.jpg", "blocked_address"),
    ("http://172.16.0.1/a.jpg", "blocked_address"),
    ("http://192.168.1.1/a.jpg", "blocked_address"),
    ("http://100.64.0.1/a.jpg", "blocked_address"),  # carrier-grade NAT, not global
    ("http://169.254.169.254/latest/meta-data/", "blocked_address"),  # cloud metadata endpoint
    ("http://metadata.google.internal/computeMetadata/v1/", "blocked_address"),
    ("http://0.0.0.0/", "blocked_address"),
    ("http://[::1]/a.jpg", "blocked_address"),
    ("http://[fe80::1]/a.jpg", "blocked_address"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "blocked_address"),
    ("http://[::ffff:127.0.0.1]/a.jpg", "blocked_address"),
    ("http://2130706433/a.jpg", "blocked_address"),  # 127.0.0.1 as one decimal number
    ("http://0x7f.1/a.jpg", "blocked_address"),
    ("http://0177.0.0.1/a.jpg", "blocked_address"),  # octal
    ("http://240.0.0.1/a.jpg", "blocked_address"),  # reserved
    ("http://168.63.129.16/machine", "blocked_address"),  # Azure's wire server: global, yet refused
    ("http://8.8.8.8/a.jpg", None),
    ("http://[2606:4700::1111]/a.jpg", None),
])
def test_url_reason(url, reason) -> None:
    assert url_reason(url) == reason


def test_allowed_networks_open_only_what_they_name() -> None:
    policy = AddressPolicy.from_strings(["127.0.0.1/32"])
    assert url_reason("http://127.0.0.1:8000/a.jpg", policy) is None
    assert url_reason("http://127.0.0.2:8000/a.jpg", policy) == "blocked_address"
    assert url_reason("http://2130706434:8000/a.jpg", policy) == "blocked_address"  # 127.0.0.2
    assert url_reason("ftp://127.0.0.1/a.jpg", policy) == "unsupported_scheme"


def test_wide_allowance_keeps_metadata_refused() -> None:
    everything = AddressPolicy.from_strings(["0.0.0.0/0", "::/0"])
    assert url_reason("http://10.1.2.3/a.jpg", everything) is None
    assert url_reason("http://169.254.169.254/latest/meta-data/", everything) == "blocked_address"
    assert url_reason("http://[fd00:ec2::254]/", everything) == "blocked_address"
    assert url_reason("http://metadata.google.internal/", everything) == "blocked_address"
    named = AddressPolicy.from_strings(["169.254.169.254/32"])
    assert url_reason("http://169.254.169.254/latest/meta-data/", named) is None
