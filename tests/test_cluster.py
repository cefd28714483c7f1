"""`reals cluster` bookkeeping without starting services: no credentials for the services or in the folder,
status of each component, `down` keeps the run history unless --purge and says what moto loses."""
from __future__ import annotations

import json

from flows.cluster import COMPONENTS, LOCAL_S3_KEYS, Cluster, credentials


def test_the_services_get_no_credentials_and_serve_gets_the_shells(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "shell-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shell-secret")
    monkeypatch.setenv("REALS_RUNS_URL", "s3://elsewhere")
    base = Cluster(tmp_path)._base_env()
    assert not [k for k in base if k.startswith(("AWS_", "REALS_"))]
    assert credentials() == ({"AWS_ACCESS_KEY_ID": "shell-key", "AWS_SECRET_ACCESS_KEY": "shell-secret"}, True)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert credentials() == (LOCAL_S3_KEYS, False)  # half a pair is no pair: the local placeholders


def test_status_names_every_component_and_a_fresh_folder_has_none_alive(tmp_path):
    from flows.cli import main

    rows = Cluster(tmp_path).status()
    assert [name for name, _, _ in rows] == list(COMPONENTS) and not any(alive for _, alive, _ in rows)
    assert main(["cluster", "status", "--dir", str(tmp_path)]) == 1


def _stopped_cluster(tmp_path) -> Cluster:
    data = tmp_path / "pg" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cluster.json").write_text(json.dumps({
        "postgres": {"root": str(tmp_path / "pg"), "data": str(data), "bin": "/nonexistent", "as_user": [],
                     "port": 1, "log": str(tmp_path / "pg.log")}, "s3": "moto", "processes": {}}))
    return Cluster(tmp_path / "c")


def test_down_keeps_the_run_history_unless_purged_and_says_moto_loses_its_bucket(tmp_path):
    c = _stopped_cluster(tmp_path)
    notes = c.down()
    assert (tmp_path / "pg" / "data" / "PG_VERSION").is_file()
    assert any("kept the run history" in n for n in notes) and any("moto" in n and "gone" in n for n in notes)
    assert Cluster(tmp_path / "c").state["postgres"]["data"] == str(tmp_path / "pg" / "data")  # the next up reuses it
    notes = Cluster(tmp_path / "c").down(purge=True)
    assert not (tmp_path / "pg").exists() and any("deleted the run history" in n for n in notes)
    assert "postgres" not in Cluster(tmp_path / "c").state
