"""deployments/prefect.yaml against a real local Prefect server: the deployments apply as the README says,
and a process worker started elsewhere picks up a run of the prune deployment and completes it.

Every server and worker started here is stopped in the fixtures' teardown, on failure too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from tasks.config.prune import PruneConfig
from tests.flows.test_prune_flow import config_for, save_model, settings_for

REPO = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "alps-process"
STARTUP_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen, signals: tuple[signal.Signals, ...]) -> None:
    """Send each signal to the process group in turn until it exits; kill it if none was enough."""
    for sent in signals:
        if process.poll() is not None:
            return
        os.killpg(process.pid, sent)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _start(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("wb") as sink:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stopped with all its children


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free port with its own PREFECT_HOME; yields the environment for
    subprocesses (PREFECT_API_URL set, plus conftest's offline settings)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PYTHONPATH=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="5")
    process = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                     home / "server.log", home)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (home / "server.log").read_text()
            assert time.monotonic() < deadline, "the Prefect server did not answer in time"
            time.sleep(1)
        yield env
    finally:
        _stop(process, (signal.SIGTERM, signal.SIGINT))


@pytest.fixture(scope="module")
def deployed(server) -> dict[str, dict]:
    """The work pool created and every deployment whose entrypoint exists applied, as the README says."""
    _cli(server, "work-pool", "create", POOL, "--type", "process")
    specs = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    present = [s for s in specs if (REPO / s["entrypoint"].split(":")[0]).is_file()]
    names = ["--all"] if len(present) == len(specs) else [f"--name={s['name']}" for s in present]
    _cli(server, "deploy", *names, "--prefect-file", str(PREFECT_FILE.relative_to(REPO)))
    return {spec["name"]: spec for spec in present}


@pytest.fixture
def worker(server, tmp_path) -> Iterator[subprocess.Popen]:
    """A process worker on the pool, started outside the repository (the pull step must move runs there)."""
    process = _start([PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"], server,
                     tmp_path / "worker.log", tmp_path)
    try:
        yield process
    finally:
        _stop(process, (signal.SIGTERM, signal.SIGINT))  # a process worker needs both to exit


def _client_for(env: dict[str, str]):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]})


def test_deployments_apply_with_pool_schedule_and_pull_step(deployed, server):
    from prefect.client.orchestration import get_client

    assert {"prune-on-demand", "nightly-sweep"} <= set(deployed)
    flows = {"flows/prune.py": "prune-model", "flows/evaluate.py": "evaluate-model", "flows/sweep.py": "sweep-models"}
    with _client_for(server), get_client(sync_client=True) as client:
        for name, spec in deployed.items():
            deployment = client.read_deployment_by_name(f"{flows[spec['entrypoint'].split(':')[0]]}/{name}")
            assert deployment.work_pool_name == POOL and deployment.entrypoint == spec["entrypoint"]
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                              {"directory": str(REPO)}}]
            assert deployment.parameters == spec["parameters"]
        sweep = client.read_deployment_by_name("sweep-models/nightly-sweep")
        assert [s.schedule.cron for s in sweep.schedules] == ["0 2 * * *"] and sweep.schedules[0].active


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tasks.model.references import locate_model

    tokenizer = AutoTokenizer.from_pretrained(locate_model("smollm2-135m").location)
    return save_model(tmp_path_factory.mktemp("deployed-model") / "model", tokenizer)


def test_worker_runs_the_prune_deployment(deployed, server, worker, tiny_model, tmp_path):
    from prefect.deployments import run_deployment

    deployed_output = deployed["prune-on-demand"]["parameters"]["config"]["output"]
    config = PruneConfig(**settings_for(tiny_model, tmp_path, pattern="0.5", evaluate=True, eval_seqlen=32,
                                        eval_max_windows=1, output=tmp_path / "pruned",
                                        overwrite=deployed_output["overwrite"])).model_dump(mode="json")
    with _client_for(server):
        run = run_deployment("prune-model/prune-on-demand", parameters={"config": config}, timeout=150,
                             poll_interval=2)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{log[-4000:]}"
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["config"]["model"] == str(tiny_model) and report["computed_blocks"] == [0, 1]


RUN_FLOW = (
    "import json, sys\n"
    "from flows.prune import prune_model\n"
    "from tasks.config.prune import PruneConfig\n"
    "print('RESULT ' + prune_model(PruneConfig.model_validate_json(sys.argv[1])).model_dump_json(exclude={'report'}))\n"
)


def _run_flow(env: dict[str, str], config: PruneConfig) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN_FLOW, config.model_dump_json()], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))[len("RESULT "):])


def test_dask_cluster_of_worker_processes_against_the_server_matches_sequential(server, tiny_model, tmp_path,
                                                                              monkeypatch):
    from distributed import LocalCluster
    from safetensors.torch import load_file

    sequential = _run_flow(server, config_for(tiny_model, tmp_path, pattern="0.6", output=tmp_path / "seq",
                                              cache_dir=tmp_path / "c1"))
    for name in ("PREFECT_API_URL", "PYTHONPATH", "PREFECT_HOME"):  # what the worker processes inherit
        monkeypatch.setenv(name, server[name])
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        parallel = _run_flow(server, config_for(tiny_model, tmp_path, pattern="0.6", output=tmp_path / "dask",
                                                cache_dir=tmp_path / "c2", task_runner="dask", solve_workers=2,
                                                runner_address=cluster.scheduler_address))
    want = load_file(str(Path(sequential["output"]) / "model.safetensors"))
    got = load_file(str(Path(parallel["output"]) / "model.safetensors"))
    assert set(want) == set(got) and all(torch.equal(got[n], want[n]) for n in want)
