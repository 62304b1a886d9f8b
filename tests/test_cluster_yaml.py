"""cluster.yaml is valid for Ray's autoscaler, offline, against the schema Ray ships, and
keeps the dashboard off the network."""

import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml

from conftest import REPO


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no work
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert any(t["max_workers"] > t["min_workers"] for t in workers)  # autoscaling
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}")
    assert any("pip install" in c and "pdray" in c for c in config["setup_commands"])


def test_no_dashboard_listens_beyond_the_heads_loopback():
    """The Jobs API behind the dashboard has no authentication: it is reached through
    `ray dashboard cluster.yaml` (an SSH tunnel), never on the head's public address."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert starts
    for command in starts:
        hosts = re.findall(r"--dashboard-host[= ](\S+)", command)
        assert hosts == ["127.0.0.1"], command  # said explicitly, and loopback
    assert "0.0.0.0" not in (REPO / "cluster.yaml").read_text()
