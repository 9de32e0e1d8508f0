"""`zenpipe migrate-legacy`: the audit's V1/V2 tables into zen_contacts (zenpipe.legacy)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import wait_for
from zenpipe import cli
from zenpipe.legacy import migrate

LEGACY = Path(__file__).resolve().parent.parent / "sql" / "legacy"


def create(conn: psycopg.Connection[Any], version: str) -> None:
    name = {"v1": "v1_scraped_contacts.sql", "v2": "v2_scraped_contacts_v2.sql"}[version]
    conn.execute((LEGACY / name).read_text())  # trusted: the repository's own file


def seed_v1(dsn: str, unique: int, dups: int, bad: int) -> None:
    """unique links; dups re-scrapes of the first links (a newer name, another email);
    bad rows (country 'XYZ', latitude 200, no link), one of each kind in turn."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        create(conn, "v1")
        conn.execute(
            "INSERT INTO scraped_contacts (name, category, country, city, lat, lng, rating,"
            " reviews, phone, emails, phones, whatsapp, facebook, link, scraped_at)"
            " SELECT 'Shop ' || g, 'cafe', CASE WHEN g %% 2 = 0 THEN 'id' ELSE 'US' END,"
            " 'Town', -6.2, 106.8, 4.5, g, '+62 812 0000 ' || g,"
            " 'a' || g || '@shop.example, info@shop.example', '+62812000' || g, NULL,"
            " 'https://facebook.com/s' || g, 'https://maps.example/v1/' || g,"
            " now() - interval '3 days' FROM generate_series(1, %s) g",
            (unique,),
        )
        conn.execute(
            "INSERT INTO scraped_contacts (name, country, emails, link, scraped_at)"
            " SELECT 'Shop ' || g || ' (new)', 'US', 'b' || g || '@shop.example',"
            " 'https://maps.example/v1/' || g, now() - interval '1 day'"
            " FROM generate_series(1, %s) g",
            (dups,),
        )
        conn.execute(
            "INSERT INTO scraped_contacts (name, country, lat, link)"
            " SELECT 'Bad ' || g, CASE WHEN g %% 3 = 0 THEN 'XYZ' ELSE 'US' END,"
            " CASE WHEN g %% 3 = 1 THEN 200 ELSE 0 END,"
            " CASE WHEN g %% 3 = 2 THEN NULL ELSE 'https://maps.example/bad/' || g END"
            " FROM generate_series(1, %s) g",
            (bad,),
        )


def contacts(dsn: str, query: str, *params: Any) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params or None).fetchall()


def test_v1_merges_duplicates_quarantines_bad_rows_and_reruns_as_a_no_op(dsn: str) -> None:
    seed_v1(dsn, unique=250, dups=30, bad=21)
    report = migrate(dsn, "v1", batch=37)
    assert report.verified, report.render()
    assert (report.source_rows, report.rows_read, report.rejected) == (301, 301, 21)
    assert report.written == 280 and report.links_with_contact == 250
    [[n, writes]] = contacts(
        dsn, "SELECT count(*), sum(scrape_count) FROM zen_contacts WHERE source_link LIKE"
        " 'https://maps.example/v1/%%'"
    )  # fmt: skip
    assert (n, writes) == (250, 280)
    [[rejects]] = contacts(dsn, "SELECT count(*) FROM zen_rejects WHERE server_id = 'legacy-v1'")
    assert rejects == 21
    [[name, emails, country, fb]] = contacts(
        dsn,
        "SELECT business_name, emails, country_code, facebook_url FROM zen_contacts"
        " WHERE source_link = 'https://maps.example/v1/2'",
    )
    assert name == "Shop 2 (new)"  # the newer observation wins
    assert emails == ["a2@shop.example", "b2@shop.example", "info@shop.example"]
    assert country == "US" and fb == "https://facebook.com/s2"
    again = migrate(dsn, "v1", batch=37)
    assert again.this_run_rows == 0 and again.verified
    assert (again.written, again.rejected) == (280, 21)
    assert contacts(dsn, "SELECT sum(scrape_count) FROM zen_contacts") == [(280,)]


def test_v2_is_migrated_with_arrays_and_socials(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        create(conn, "v2")
        conn.execute(
            "INSERT INTO scraped_contacts_v2 (partition_key, source_link, business_name,"
            " country_code, rating, emails, whatsapp, socials)"
            " SELECT abs(hashtext(l)) % 32, l, 'V2 ' || g, CASE WHEN g = 7 THEN 'Q' ELSE 'ID'"
            " END, 4.2, ARRAY['x' || g || '@v2.example'], ARRAY['+62811' || g],"
            " jsonb_build_object('instagram', 'https://instagram.com/v' || g)"
            " FROM generate_series(1, 40) g, LATERAL (SELECT 'https://maps.example/v2/' || g)"
            " AS x(l)"
        )
    report = migrate(dsn, "v2", batch=16)
    assert report.verified and (report.written, report.rejected) == (39, 1)
    [[wa, ig]] = contacts(
        dsn,
        "SELECT whatsapp, instagram_url FROM zen_contacts"
        " WHERE source_link = 'https://maps.example/v2/3'",
    )
    assert wa == ["+628113"] and ig == "https://instagram.com/v3"


def test_killed_mid_run_it_resumes_and_counts_nothing_twice(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_v1(dsn, unique=6000, dups=0, bad=60)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zenpipe", "migrate-legacy", "--from", "v1", "--dsn", dsn,
         "--batch", "40"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                contacts(dsn, "SELECT coalesce(sum(rows_read), 0) FROM zen_legacy_progress")
                >= [(400,)]
            )
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    [[read, finished]] = contacts(dsn, "SELECT rows_read, finished_at FROM zen_legacy_progress")
    assert finished is None and 400 <= read < 6060, "killed after it finished: nothing shown"
    assert cli.main(["migrate-legacy", "--from", "v1", "--dsn", dsn, "--batch", "500"]) == 0
    out = capsys.readouterr().out
    assert "source rows 6,060" in out and "rejected 60" in out and "verified" in out
    assert contacts(dsn, "SELECT count(*), sum(scrape_count) FROM zen_contacts") == [(6000, 6000)]
    assert contacts(dsn, "SELECT count(*) FROM zen_rejects") == [(60,)]
