"""Tests of the bundled provider catalog: every rule of tests/catalog_check.py, and that
authsome itself loads every provider and routes only to the providers' own hosts."""

import authsome
from catalog_check import check_catalog
from conftest import REPO


def test_catalog_passes_all_rules():
    failures, count, rejected = check_catalog(str(REPO / "providers.json"))
    assert failures == []
    assert count == 86
    assert rejected > 200


def test_catalog_loads_in_authsome(tmp_path):
    catalog = authsome.load_catalog(str(tmp_path))
    assert len(catalog.providers) == 86
    assert catalog.problems == []


def test_routes_reject_near_misses(tmp_path):
    catalog = authsome.load_catalog(str(tmp_path))
    table = authsome.RouteTable([route for provider in catalog for route in provider.routes])
    for host in ("api.g2.com.example.net", "xapi.g2.com", "googleapis.com.evil.test",
                 "evil-googleapis.com", "linear.app.example.net", "githubusercontent.com.evil.test",
                 "api.openai.com.example.org"):
        assert not table.intercepts(host, 443), host
    for host in ("api.g2.com", "API.G2.COM.", "www.googleapis.com", "api.linear.app",
                 "raw.githubusercontent.com", "api.openai.com"):
        assert table.intercepts(host, 443), host


def test_exact_host_beats_google_regex(tmp_path):
    catalog = authsome.load_catalog(str(tmp_path))
    routes = catalog.get("google").routes + catalog.get("gemini").routes
    route, reason = authsome.RouteTable(routes).resolve("generativelanguage.googleapis.com", 443,
                                                        "/v1/models")
    assert route.provider == "gemini", reason
