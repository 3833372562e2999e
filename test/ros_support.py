"""Helpers for the tests that run under real ROS 2 (rclpy): skip-or-fail, isolated domains, node processes,
and an rclpy client that plays the C-arm and the robot.

``FLUOROSAM_REQUIRE_ROS=1`` (set by .ci/run) turns a missing rclpy or message package into a failure, so a
broken install step fails CI instead of hiding behind skips.
"""
from __future__ import annotations

import importlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROS_MODULES = ("rclpy", "rclpy.lifecycle", "sensor_msgs.msg", "std_msgs.msg", "diagnostic_msgs.msg",
               "vision_msgs.msg", "lifecycle_msgs.srv", "ament_index_python")
_DOMAINS = itertools.count(1 + os.getpid() % 150)  # distinct per test and per parallel run


def require_ros(*extra: str) -> None:
    """Import ROS 2's Python packages or skip the test (fail instead when CI asks for ROS)."""
    for name in ROS_MODULES + extra:
        try:
            importlib.import_module(name)
        except ImportError as error:
            reason = f"ROS 2 is not installed here ({name}: {error}); see README 'ROS 2'"
            if os.environ.get("FLUOROSAM_REQUIRE_ROS") == "1":
                pytest.fail(f"FLUOROSAM_REQUIRE_ROS=1 but {reason}")
            pytest.skip(reason)


def next_domain() -> int:
    return next(_DOMAINS) % 200 + 1


def ros_env(domain: int, **extra: str) -> dict:
    """Environment of a ROS process on its own domain, discovery on loopback only."""
    return dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1", **extra)


def executable(name: str) -> str:
    """A console script of this environment (the pip install's ``fluorosam_node``)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name) or pytest.fail(f"{name} is not installed")


class NodeProcess:
    """A node started as its own process, output in ``log``; :meth:`stop` returns the exit code."""

    def __init__(self, argv: list[str], env: dict, log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {needle!r} in the node's output (exit {self.process.poll()}):\n{self.text()}")

    def stop(self, signum: int = signal.SIGINT, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"node did not exit {timeout_s} s after signal {signum}:\n{self.text()}") from None


def mono16_frame(h: int = 48, w: int = 40) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 37 % 4096).astype(np.uint16)


class RosClient:
    """An rclpy node in its own context on ``domain``: publishes frames (best effort, sensor-data QoS) and
    prompts (reliable, transient local), and records masks, detections and diagnostics."""

    def __init__(self, domain: int, topics=None) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from vision_msgs.msg import Detection2DArray

        from fluorosam_ros.params import NodeParams

        topics = topics or NodeParams()
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node("fluorosam_test_client", context=self.context)
        self.masks, self.detections, self.diagnostics = [], [], []
        self._lock = threading.Lock()
        self.node.create_subscription(Image, topics.mask_topic, self._keep(self.masks), 50)
        self.node.create_subscription(Detection2DArray, topics.detections_topic, self._keep(self.detections), 50)
        self.node.create_subscription(DiagnosticArray, topics.diagnostics_topic, self._keep(self.diagnostics), 50)
        prompt_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.prompt_pub = self.node.create_publisher(String, topics.prompt_topic, prompt_qos)
        self.image_pub = self.node.create_publisher(Image, topics.image_topic, qos_profile_sensor_data)
        self._String = String
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()

    def _keep(self, store: list):
        def callback(msg) -> None:
            with self._lock:
                store.append(msg)
        return callback

    def prompt(self, text: str) -> None:
        self.prompt_pub.publish(self._String(data=text))

    def image(self, pixels: np.ndarray, sec: int, encoding: str | None = None, frame_id: str = "carm"):
        from fluorosam_ros.messages import Header, numpy_to_image
        from fluorosam_ros.transports.rclpy_transport import image_to_ros

        return image_to_ros(numpy_to_image(pixels, encoding, Header(sec, 500, frame_id)))

    def send_until_mask(self, msg, timeout_s: float = 60.0, period_s: float = 0.3):
        """Publish ``msg`` until a mask with its stamp arrives (best effort: the first may go unseen)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.image_pub.publish(msg)
            found = self.wait(lambda: self.mask_for(msg.header.stamp.sec), period_s)
            if found is not None:
                return found
        raise AssertionError(f"no mask for stamp {msg.header.stamp.sec} within {timeout_s} s")

    def mask_for(self, sec: int):
        with self._lock:
            return next((m for m in self.masks if m.header.stamp.sec == sec), None)

    def detections_for(self, sec: int):
        with self._lock:
            return next((d for d in self.detections if d.header.stamp.sec == sec), None)

    def last_diagnostics(self) -> dict:
        with self._lock:
            if not self.diagnostics:
                return {}
            status = self.diagnostics[-1].status[0]
        return {"level": status.level, "message": status.message, **{kv.key: kv.value for kv in status.values}}

    @staticmethod
    def wait(predicate, timeout_s: float, poll_s: float = 0.05):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll_s)
        return None

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
