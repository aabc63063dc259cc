"""The Prometheus exporter (``train.metrics_port``): every numeric field of every record, latest value,
served by rank 0 on 127.0.0.1; wired into the engine."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shards.errors import UserError
from trainer.config import ConfigError, compose
from trainer.engine.prometheus import PrometheusSink, check_port


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_records_become_labelled_gauges_with_their_latest_value() -> None:
    sink = PrometheusSink(0, run="demo")
    try:
        assert sink.addr == "127.0.0.1" and sink.port > 0
        sink.log({"kind": "train", "time": 1.0, "step": 10, "epoch": 0, "loss": 2.5, "lr": 1e-3})
        sink.log({"kind": "train", "time": 2.0, "step": 20, "epoch": 1, "loss": 1.25, "lr": 1e-3})
        sink.log({"kind": "eval", "time": 3.0, "epoch": 1, "results": {
            "dukemtmc": {"mAP": 0.41, "R1": 0.6}, "market1501": {"mAP": 0.3, "R1": 0.5},
            "train_clustering": {"clusters": 221, "true_ids": 256}}})
        sink.log({"kind": "cluster", "epoch": 1, "clusters": 230, "ari": 0.4})
        sink.log({"kind": "checkpoint", "step": 20, "path": "runs/x/checkpoints/step_20"})  # strings skipped
        sink.log({"kind": "end", "status": "finished", "best": {"dukemtmc": {"mAP": 0.5, "epoch": 3}}})
        got = _scrape(f"http://127.0.0.1:{sink.port}/metrics")
        run = (("run", "demo"),)
        assert got[("reid_train_loss", run)] == 1.25 and got[("reid_train_step", run)] == 20
        assert got[("reid_eval_mAP", (("run", "demo"), ("target", "dukemtmc")))] == pytest.approx(0.41)
        assert got[("reid_eval_mAP", (("run", "demo"), ("target", "market1501")))] == pytest.approx(0.3)
        assert got[("reid_eval_train_clustering_clusters", run)] == 221
        assert got[("reid_cluster_clusters", run)] == 230
        assert got[("reid_checkpoint_step", run)] == 20 and not any("path" in k[0] for k in got)
        assert got[("reid_end_best_mAP", (("run", "demo"), ("target", "dukemtmc")))] == pytest.approx(0.5)
    finally:
        sink.close()


def test_busy_port_is_a_one_line_user_error_naming_the_key_and_the_fix() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        for make in (PrometheusSink, check_port):
            with pytest.raises(UserError) as err:
                make(port)
            msg = str(err.value)
            assert "\n" not in msg
            assert msg.startswith(f"train.metrics_port={port}: cannot serve metrics on 127.0.0.1:{port}")
            assert "train.metrics_port=0 for any free port" in msg and "train.metrics_port=-1" in msg
    check_port(port)  # free again: the check leaves nothing bound behind
    check_port(port)


def test_unknown_address_names_the_address_key() -> None:
    with pytest.raises(UserError, match=r"train.metrics_addr=no-such-host.invalid: not an address of this host"):
        check_port(0, "no-such-host.invalid")


def _busy_port_body(rank: int, world_size: int, run_dir: str, port: int) -> str:
    """Rank 0 alone binds the exporter: every rank must raise its error (none waits in a collective)."""
    from tests.test_engine import ToyMethod, _cfg
    from trainer.config import EvalConfig
    from trainer.engine.loop import Engine

    try:
        Engine(ToyMethod(), _cfg(epochs=1, metrics_port=port), EvalConfig(), run_dir)
    except UserError as exc:
        return str(exc)
    return "no error"


def test_busy_port_stops_every_rank_with_the_same_line(tmp_path: Path) -> None:
    from tests.mp import run_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        lines = run_distributed(_busy_port_body, 2, str(tmp_path), port)
    assert lines[0] == lines[1] and lines[0].startswith(f"train.metrics_port={port}: cannot serve metrics")
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the run wrote anything


def test_bad_port_fails_at_compose() -> None:
    with pytest.raises(ConfigError, match="train.metrics_port=70000"):
        compose(["exp=pat_smoke", "train.metrics_port=70000"])


def test_engine_serves_its_records_while_training(tmp_path: Path) -> None:
    from tests.test_engine import ToyMethod, _cfg
    from trainer.config import EvalConfig
    from trainer.engine.loop import Engine

    records: list[dict] = []
    seen: dict = {}

    class Probe(ToyMethod):
        calls = 0

        def after_optimizer_step(self, model, batch, result) -> None:  # scrape mid-run, from inside the loop
            super().after_optimizer_step(model, batch, result)
            Probe.calls += 1
            if Probe.calls == 3:
                seen.update(_scrape([r for r in records if r["kind"] == "metrics_server"][0]["url"]))

    class ListSink:
        def log(self, record: dict) -> None:
            records.append(record)

        def close(self) -> None:
            pass

    Engine(Probe(), _cfg(epochs=1, metrics_port=0), EvalConfig(), tmp_path, sinks=[ListSink()]).fit()
    assert records[0]["kind"] == "metrics_server" and records[0]["url"].startswith("http://127.0.0.1:")
    assert seen[("reid_train_step", (("run", tmp_path.name),))] == 2  # the latest step logged so far
    with pytest.raises(OSError):  # closed with the run
        urllib.request.urlopen(records[0]["url"], timeout=2)
