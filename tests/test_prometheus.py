"""The Prometheus exporters (``train.metrics_port``): every rank serves its own metrics, named by Prometheus'
conventions, on 127.0.0.1 at the base port + its local rank, and can push them to a Pushgateway."""

from __future__ import annotations

import http.server
import re
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shards.errors import UserError
from trainer.config import ConfigError, compose
from trainer.engine.prometheus import PrometheusSink, check_port

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Scrape:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(url: str) -> Scrape:
    return _parse(urllib.request.urlopen(url, timeout=10).read().decode())


def _get(got: Scrape, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    hits = [v for (n, ls), v in got.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def _free_pair() -> int:
    """A base port whose successor is free too (for the base + local rank layout)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return base
    raise RuntimeError("no two consecutive free ports")


TRAIN = {"kind": "train", "epoch": 0, "lr": 1e-3, "sec": 0.2, "img_per_s": 160.0, "data_wait_s": 0.02,
         "data_wait_ratio": 0.1, "memory_s": 0.003, "mfu": 0.25, "mem_peak_bytes": 123456789, "rank_images": 16,
         "id": 1.5, "tri": 0.5, "acc": 0.75}


def test_records_become_conventional_metrics() -> None:
    sink = PrometheusSink(0, run="demo", rank=1, build={"version": "0.1.0", "strategy": "ddp", "method": "pat"})
    try:
        assert sink.addr == "127.0.0.1" and sink.port > 0 and sink.url == f"http://127.0.0.1:{sink.port}/metrics"
        sink.log({**TRAIN, "time": 1.0, "step": 10, "loss": 2.5})
        sink.log({**TRAIN, "time": 2.0, "step": 11, "loss": 1.25, "sec": 0.4, "data_wait_s": 2.0})
        sink.log({"kind": "eval", "time": 3.0, "epoch": 1, "step": 11, "seconds": 4.5, "results": {
            "dukemtmc": {"mAP": 0.41, "R1": 0.6, "R5": 0.8, "mINP": 0.2}, "market1501": {"mAP": 0.3, "R1": 0.5},
            "train_clustering": {"clusters": 221, "true_ids": 256}}})
        sink.log({"kind": "cluster", "epoch": 1, "clusters": 230, "outliers": 50, "images": 200, "extract_s": 1.5,
                  "cluster_s": 0.25, "ari": 0.4})
        sink.log({"kind": "checkpoint", "step": 11, "path": "runs/x/checkpoints/step_11"})
        got = _scrape(sink.url)
    finally:
        sink.close()
    me = {"run": "demo", "rank": "1"}
    assert _get(got, "reid_build_info", version="0.1.0", strategy="ddp", method="pat", **me) == 1
    assert _get(got, "reid_train_steps_total", **me) == 2
    assert _get(got, "reid_train_samples_total", **me) == 32  # this rank's images, 16 a step
    assert _get(got, "reid_step_duration_seconds_count", **me) == 2
    assert _get(got, "reid_step_duration_seconds_sum", **me) == pytest.approx(0.6, abs=1e-12)  # float sum
    assert _get(got, "reid_step_duration_seconds_bucket", le="0.25", **me) == 1  # 0.2 in, 0.4 out
    assert _get(got, "reid_data_wait_seconds_count", **me) == 2
    assert _get(got, "reid_data_wait_seconds_bucket", le="0.05", **me) == 1
    losses = {ls: v for (n, ls), v in got.items() if n == "reid_loss"}
    assert {dict(ls)["term"]: v for ls, v in losses.items()} == {"total": 1.25, "id": 1.5, "tri": 0.5}  # not acc
    assert _get(got, "reid_learning_rate", **me) == 1e-3
    assert _get(got, "reid_mfu_ratio", **me) == 0.25
    assert _get(got, "reid_memory_sync_seconds", **me) == 0.003
    assert _get(got, "reid_device_memory_peak_bytes", **me) == 123456789
    assert _get(got, "reid_train_global_step", **me) == 11
    assert _get(got, "reid_eval_map_ratio", target="dukemtmc", **me) == 0.41
    assert _get(got, "reid_eval_rank1_ratio", target="market1501", **me) == 0.5
    assert _get(got, "reid_eval_minp_ratio", target="dukemtmc", **me) == 0.2
    assert not [ls for (n, ls), _ in got.items() if dict(ls).get("target") == "train_clustering"]  # not a target
    assert _get(got, "reid_eval_duration_seconds", **me) == 4.5
    assert _get(got, "reid_clusters", **me) == 230
    assert _get(got, "reid_cluster_outlier_ratio", **me) == 0.25  # 50 of 200 images
    assert _get(got, "reid_cluster_duration_seconds", phase="extract", **me) == 1.5
    assert _get(got, "reid_cluster_duration_seconds", phase="cluster", **me) == 0.25
    assert _get(got, "reid_checkpoint_global_step", **me) == 11
    # the conventions: one prefix, snake case, counters end in _total
    assert all(re.fullmatch(r"reid_[a-z0-9_]+", n) for n, _ in got), sorted({n for n, _ in got})
    assert all(dict(ls).get("rank") == "1" and dict(ls).get("run") == "demo" for _, ls in got)


def test_local_rank_serves_on_the_base_port_plus_its_local_rank() -> None:
    base = _free_pair()
    sink = PrometheusSink(base, local_rank=1)
    try:
        assert sink.port == base + 1
        with pytest.raises(UserError) as err:  # taken now: the line names the base key and the port tried
            check_port(base, local_rank=1)
        msg = str(err.value)
        assert msg.startswith(f"train.metrics_port={base}: cannot serve metrics on 127.0.0.1:{base + 1} "
                              f"(local rank 1: the base port + 1)") and "\n" not in msg, msg
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


class _Gateway(http.server.BaseHTTPRequestHandler):
    """A Pushgateway stand-in: records each push (method, path, body)."""

    pushes: list[tuple[str, str, str]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        _Gateway.pushes.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_pushes_to_a_pushgateway_periodically_and_at_close() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Gateway.pushes.clear()
    try:
        sink = PrometheusSink(None, run="r1", rank=3, push_url=f"http://127.0.0.1:{server.server_port}",
                              push_every_s=0.05)
        assert sink.port == -1  # push only: no server
        sink.log({**TRAIN, "step": 1, "loss": 1.0})
        deadline = threading.Event()
        for _ in range(100):  # the periodic push, before close
            if _Gateway.pushes:
                break
            deadline.wait(0.05)
        assert _Gateway.pushes, "no periodic push within 5 s"
        sink.log({**TRAIN, "step": 2, "loss": 0.5})
        sink.close()
    finally:
        server.shutdown()
        server.server_close()
    method, path, body = _Gateway.pushes[-1]  # the final push has both steps
    assert method == "PUT" and path == "/metrics/job/reid/rank/3/run/r1"  # grouping labels sorted
    got = _parse(body)
    assert _get(got, "reid_train_steps_total") == 2 and _get(got, "reid_loss", term="total") == 0.5


def test_a_gateway_that_does_not_answer_never_stops_the_run(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        sink = PrometheusSink(None, push_url=f"http://127.0.0.1:{s.getsockname()[1]}", push_every_s=60)
        sink.log({**TRAIN, "step": 1, "loss": 1.0})
        sink.close()  # the final push fails: said, not raised
    assert any("push failed" in r.getMessage() for r in caplog.records)


def test_push_url_is_checked_at_compose() -> None:
    with pytest.raises(ConfigError, match=r"^train.metrics_push_url='pushgateway:9091': expected empty \(no push\) "
                                          r"or a Pushgateway URL"):
        compose(["exp=pat_smoke", "train.metrics_push_url=pushgateway:9091"])


def _busy_port_body(rank: int, world_size: int, run_dir: str, port: int) -> str:
    """Rank 0's port is taken (rank 1's, the next one, may be free): every rank must raise rank 0's
    error, none may wait in a collective."""
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
    assert records[0]["urls"] == [records[0]["url"]]  # one rank
    assert _get(seen, "reid_train_global_step", run=tmp_path.name, rank="0") == 2  # the latest step logged so far
    assert _get(seen, "reid_build_info", method="probe", strategy="ddp") == 1  # the class, less "Method"
    with pytest.raises(OSError):  # closed with the run
        urllib.request.urlopen(records[0]["url"], timeout=2)


# -- acceptance: a real 2-rank run, scraped over HTTP mid-training --------------------------------------------

SCRAPE_AT = (3, 7)
"""Scrape when both ranks enter the memory hook of these steps: each has logged exactly one step less."""


def _two_rank_body(rank: int, world_size: int, run_dir: str) -> list[dict[str, Scrape]]:
    """pat_smoke on the engine, 2 gloo ranks; at each of :data:`SCRAPE_AT` both ranks stop in a barrier
    (each has logged its previous step, none is writing a metric) and rank 0 scrapes both exporters."""
    from trainer import dist
    from trainer.data.prepare import ensure_datasets
    from trainer.engine.loop import Engine
    from trainer.methods import build_method

    cfg = compose(["exp=pat_smoke", f"run_dir={run_dir}", "train.epochs=2", "eval.period=1",
                   "train.ckpt_every_steps=0", "train.metrics_port=0"])
    ensure_datasets(cfg.data)
    method = build_method(cfg)
    engine = Engine(method, cfg.train, cfg.eval, run_dir, global_batch=cfg.batch_plan(world_size).images)
    assert engine.exporter is not None
    urls = dist.all_gather_object(engine.exporter.url)
    scrapes: list[dict[str, Scrape]] = []
    hook, calls = method.after_optimizer_step, [0]

    def probe(model: Any, batch: Any, result: Any) -> None:
        calls[0] += 1
        if calls[0] in SCRAPE_AT:
            dist.barrier()
            if rank == 0:
                scrapes.append({url: _scrape(url) for url in urls})
            dist.barrier()
        hook(model, batch, result)

    method.after_optimizer_step = probe  # type: ignore[method-assign]
    engine.fit()
    return scrapes


@pytest.mark.timeout(240)
def test_two_ranks_serve_their_own_metrics_mid_training(tmp_path: Path) -> None:
    from tests.mp import run_distributed

    scrapes = run_distributed(_two_rank_body, 2, str(tmp_path / "run"))[0]
    events = list((tmp_path / "run" / "tb").iterdir())  # TensorBoard: rank 0 alone writes
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents."), events
    assert len(scrapes) == len(SCRAPE_AT)
    samples = {}
    for at, scrape in zip(SCRAPE_AT, scrapes):
        assert len(scrape) == 2  # one exporter per rank, on its own port
        for rank, got in enumerate(scrape.values()):
            me = {"rank": str(rank), "run": "run"}
            steps = _get(got, "reid_train_steps_total", **me)
            assert steps == at - 1
            assert _get(got, "reid_step_duration_seconds_count", **me) == steps  # one observation per step
            assert _get(got, "reid_data_wait_seconds_count", **me) == steps
            assert 0 < _get(got, "reid_step_duration_seconds_sum", **me) < 60 * steps
            assert _get(got, "reid_train_global_step", **me) == steps
            samples[at, rank] = _get(got, "reid_train_samples_total", **me)
            assert samples[at, rank] == 16 * steps  # pat_smoke: 8 ids x 4 images, half on each rank
            terms = {dict(ls)["term"] for (n, ls), _ in got.items() if n == "reid_loss"}
            assert terms == {"total", "id", "tri", "csl"}
            assert 0 < _get(got, "reid_loss", term="total", **me) < 100
            assert 0 < _get(got, "reid_learning_rate", **me) <= 0.01  # pat_smoke's LR, warming up
            assert 0 < _get(got, "reid_mfu_ratio", **me) <= 1
            assert _get(got, "reid_memory_sync_seconds", **me) >= 0
            assert _get(got, "reid_device_memory_peak_bytes", **me) > 100 * 2**20  # a process with torch in it
            assert _get(got, "reid_build_info", method="pat", strategy="ddp", **me) == 1
            if at > 4:  # evaluated after the first epoch (4 steps): every rank has the results
                assert 0 <= _get(got, "reid_eval_map_ratio", target="smoke_b", **me) <= 1
                assert 0 <= _get(got, "reid_eval_rank1_ratio", target="smoke_b", **me) <= 1
    assert all(samples[SCRAPE_AT[1], r] > samples[SCRAPE_AT[0], r] for r in range(2))  # still counting
