"""Dashboards, compose and Kubernetes files; every dashboard query against a real Prometheus."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from servers import Server, free_port

DEPLOY = Path(__file__).parent.parent / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
METRIC = re.compile(r"lmm_steer:[a-z0-9_]+")


def _exprs():
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                yield path.name, panel["title"], target["expr"]


def _exported_names() -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    from lmm_steer.metrics import Metrics

    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"), "counter": ("_total",),
                "gauge": ("",)}
    names = set()
    for family in text_string_to_metric_families(Metrics("m").render().decode()):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def test_dashboards_are_valid_and_reference_only_exported_metrics():
    assert {p.name for p in DASHBOARDS} == {"serving.json", "steering.json"}
    exported = _exported_names()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), path
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] == "prometheus" and panel["targets"]
    for name, title, expr in _exprs():
        for metric in METRIC.findall(expr):
            assert metric in exported, f"{name} / {title}: {metric} is not exported"


def test_compose_and_prometheus_config_point_at_the_server():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["lmm-steer"]["ports"] == ["8000:8000"]
    assert {"prometheus", "grafana"} <= set(compose["services"])
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["lmm-steer:8000"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "USER steer" in dockerfile and "HEALTHCHECK" in dockerfile and "/health" in dockerfile


def test_kubernetes_manifests():
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in (DEPLOY / "k8s").glob("*.yaml")}
    container = docs["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the pod outlives the server's drain: its --drain-timeout plus the time to send the last errors
    from lmm_steer.cli import build_parser
    from lmm_steer.serve import DrainingServer

    args = build_parser().parse_args(["serve", *container["args"]])
    assert "--drain-timeout" in container["args"]  # said where the grace below is sized from it
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = docs["deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # preStop's wait, then the whole drain: running requests, the last errors, uvicorn's close
    assert grace >= float(pre_stop[1]) + args.drain_timeout + DrainingServer.ERROR_FLUSH_S + DrainingServer.CLOSE_S
    annotations = docs["deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == "8000"
    assert docs["service"]["spec"]["ports"][0]["port"] == 8000
    assert docs["servicemonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = docs["hpa"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "lmm-steer"
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "lmm_steer_num_requests_waiting"


def test_the_balancer_config_and_the_replica_compose_file():
    # the HAProxy configuration tests/test_replicas.py runs checks the readiness path Kubernetes uses,
    # and the compose file mounts it in front of replicas with the names and port it points at
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert re.search(r"(?m)^\s*option httpchk GET /ready$", cfg) and "http-check expect status 200" in cfg
    servers = re.findall(r"(?m)^\s*server (\S+) (\S+):(\d+)$", cfg)
    compose = yaml.safe_load((DEPLOY / "docker-compose.replicas.yml").read_text())["services"]
    assert {host for _, host, _ in servers} == {"lmm-steer-1", "lmm-steer-2"} <= set(compose)
    assert {port for *_, port in servers} == {"8000"}
    assert compose["haproxy"]["volumes"] == ["./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    assert "8000:8000" in compose["haproxy"]["ports"]
    from lmm_steer.cli import build_parser
    from lmm_steer.serve import DrainingServer

    for name in ("lmm-steer-1", "lmm-steer-2"):
        args = build_parser().parse_args(["serve", *compose[name]["command"]])
        grace = float(compose[name]["stop_grace_period"].removesuffix("s"))
        assert grace >= args.drain_timeout + DrainingServer.ERROR_FLUSH_S + DrainingServer.CLOSE_S
    k8s = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    assert k8s["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/ready"


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="needs Debian's prometheus package (.ci/run installs it)")
def test_every_dashboard_query_returns_data_from_real_prometheus(tmp_path):
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"name": "push-3", "description": "feature 3 up",
                                   "steering": {"features": [{"id": 3, "value": 20.0}]}}))
    server = Server("--model", "builtin:tiny-llava-next", "--sae", "builtin:random-topk", "--max-seq-len", "512",
                    "--clamp-effect-every", "2", "--presets", str(presets))
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "lmm-steer", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}],
    }))
    prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr):
        r = httpx.get(api, params={"query": expr}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if query("up") and query("up")[0]["value"][1] == "1":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("prometheus never scraped the server")
        time.sleep(2)  # a baseline sample before the traffic, so rates and increases have two points
        msgs = [{"role": "user", "content": "Tell me a story"}]
        for i in range(6):
            body = {"messages": msgs, "max_tokens": 6, "ignore_eos": True}
            if i % 2:
                body["clamps"] = {str(3 + i): 20.0}
            if i == 4:
                body["model"] = "builtin:tiny-llava-next:push-3"
            assert server.post("/v1/chat/completions", body).status_code == 200
            time.sleep(0.3)
        assert server.post("/v1/chat/completions", {"messages": msgs, "n": 2}).status_code == 400
        time.sleep(3)
        empty = [(name, title, expr) for name, title, expr in _exprs() if not query(expr)]
        assert not empty, empty
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        server.stop()
