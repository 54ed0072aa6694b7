"""The same app on Ray Serve (:mod:`merge.serve.ray_app`), on a local single-node Ray cluster the test starts and
stops: two fixed replicas answer the ``openai`` client on the same routes, streamed and not, equal to
``CombinedModel.chat`` alone, with the same errors; an autoscaled deployment (1 to 2 replicas) grows under load;
``app_builder`` (Ray's ``serve run`` entry) reads its keys and refuses unknown ones."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest

from merge.errors import MergeError
from merge.runtime import CombinedModel
from merge.serve.service import ServeOptions

ray = pytest.importorskip("ray", reason="Ray Serve is the [ray] extra (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow  # a Ray cluster starts (about 10 s here), replicas load, one autoscales

TOKENS = 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance (2 CPUs, a small object store, no dashboard), Serve's proxy on loopback; stopped after."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # loopback only; no token written into the home folder
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    for side in ("REPLICA", "HANDLE"):  # autoscaling metrics every half second (the autoscaling test waits on them)
        mp.setenv(f"RAY_SERVE_{side}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()


def test_two_replicas_serve_the_same_routes(cluster, combined):
    from merge.serve.ray_app import build

    folder = combined("tiny")
    model = CombinedModel(folder)
    options = ServeOptions(max_batch=4, max_tokens=64, model_name="tiny")
    serve.run(build(folder, options, num_replicas=2, cpus_per_replica=0.5), name="fixed", route_prefix="/fixed")
    status = serve.status().applications["fixed"].deployments["qwen3vl-merge"]
    assert status.replica_states == {"RUNNING": 2}

    client = openai.OpenAI(base_url=cluster + "/fixed/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompts = ["Hello there.", "Tell me a story.", "Hi", "What is this?"]
    answers: dict[str, str] = {}

    def ask(prompt: str) -> None:
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=TOKENS, stream=True)
        answers[prompt] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == {p: model.chat(p, max_new_tokens=TOKENS)[0] for p in prompts}
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=TOKENS)
    assert whole.choices[0].message.content == answers["Hi"] and whole.usage.completion_tokens == TOKENS
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=65)
    assert caught.value.body["param"] == "max_tokens"
    serve.delete("fixed")


def test_autoscaling_adds_a_replica_under_load(cluster, combined):
    from merge.serve.ray_app import build

    options = ServeOptions(max_batch=1, max_tokens=1024, model_name="tiny")
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                   "downscale_delay_s": 60}
    serve.run(build(combined("tiny"), options, autoscaling=autoscaling, cpus_per_replica=0.5), name="auto",
              route_prefix="/auto")
    replicas = lambda: serve.status().applications["auto"].deployments["qwen3vl-merge"].replica_states  # noqa: E731
    assert replicas() == {"RUNNING": 1}
    client = openai.OpenAI(base_url=cluster + "/auto/v1", api_key="unused", max_retries=0, timeout=300)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                           max_tokens=1024)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 90
        while replicas().get("RUNNING", 0) < 2:
            assert time.monotonic() < deadline, replicas()
            time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)
    serve.delete("auto")


def test_app_builder_reads_serve_runs_keys(combined, tmp_path):
    from merge.serve.ray_app import app_builder

    folder = str(combined("tiny"))
    app = app_builder({"combined": folder, "min_replicas": "1", "max_replicas": "3", "max_batch": "4",
                       "model_name": "tiny", "allow_local_media": str(tmp_path), "allow_remote_media": "true"})
    deployment = app._bound_deployment
    assert deployment.name == "qwen3vl-merge"
    config = deployment._deployment_config
    assert config.autoscaling_config.max_replicas == 3 and config.autoscaling_config.target_ongoing_requests == 4
    assert config.max_ongoing_requests == 4 + 64
    options = deployment.init_args[1]
    assert options.model_name == "tiny" and options.media.remote and options.media.local_root == tmp_path.resolve()
    assert options.threads == 1  # as many as the CPUs the replica asks of Ray
    fixed = app_builder({"combined": folder, "num_replicas": "2"})._bound_deployment
    assert fixed._deployment_config.num_replicas == 2
    for args, message in (({}, "needs combined=DIR"), ({"combined": folder, "colour": "red"}, "unknown key"),
                          ({"combined": folder, "max_batch": "many"}, "not a number"),
                          ({"combined": folder, "num_replicas": "2", "max_replicas": "3"}, "not both")):
        with pytest.raises(MergeError, match=message):
            app_builder(args)
