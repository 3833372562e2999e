"""The DDS transport (Cyclone DDS, no ROS install needed) as a true ROS 2 peer of real rclpy over Fast DDS:
frames and prompts from an rclpy client, masks back; rclpy sees the transport's endpoints with their
REP-2016 type hashes; a client leaving (dispose / unregister) is no error; discovery follows ROS 2's own
settings (ROS_DOMAIN_ID, LOCALHOST range); a flood of bad prompts logs a few lines, not thousands."""
import signal
import time

from ros_support import NodeProcess, RosClient, mono16_frame, next_domain, require_ros, ros_env

from fluorosam_ros import ros_types
from fluorosam_ros.testing import save_random_model, write_params

IMAGE_HASH = "RIHS01_d31d41a9a4c4bc8eae9be757b0beed306564f7526c88ea6a4588fb9582527d47"  # rclpy's, Jazzy


def _hashes(infos) -> set[str]:
    return {str(info.topic_type_hash) for info in infos}


def test_dds_transport_is_answered_by_rclpy_and_shows_ros_type_hashes(tmp_path):
    require_ros()
    import sys

    domain = next_domain()
    model = save_random_model(tmp_path / "model")
    params_file = write_params(tmp_path / "params.yaml", model_dir=str(model), backend="torch", threads=1,
                               publish_overlay=False, min_score=0.0, diagnostics_period_s=0.5)
    env = ros_env(domain)
    env.pop("CYCLONEDDS_URI", None)  # the transport derives its configuration from the ROS_* settings
    client = RosClient(domain)
    node = NodeProcess([sys.executable, "-m", "fluorosam_ros.cli", "node", "--transport", "dds",
                        "--params", str(params_file)], env, tmp_path / "node.log")
    try:
        client.prompt("left lung")
        node.wait_for_log("node ready")
        mask = client.send_until_mask(client.image(mono16_frame(), sec=41))
        assert mask.header.stamp.sec == 41 and mask.encoding == "mono8"

        publishers = client.node.get_publishers_info_by_topic("/fluorosam/mask")
        assert IMAGE_HASH in _hashes(publishers) and ros_types.type_hash(ros_types.IMAGE) == IMAGE_HASH
        assert _hashes(client.node.get_publishers_info_by_topic("/fluorosam/detections")) == {
            ros_types.type_hash(ros_types.DETECTIONS)}
        subscribers = _hashes(client.node.get_subscriptions_info_by_topic("/carm/image"))
        assert subscribers == {IMAGE_HASH}, subscribers  # the node's reader; no INVALID among them

        for i in range(3000):  # malformed: a point needs x,y,label; paced, as the prompt topic keeps only the last
            client.prompt(f"left lung @ {i},2")
            time.sleep(0.001)
        report = client.wait(lambda: (d := client.last_diagnostics()) and int(d["bad_prompts"]) >= 1000 and d, 30)
        assert report and "prompt rejected" in report["last_error"]
        client.node.destroy_publisher(client.image_pub)  # the C-arm leaves: a dispose/unregister notice
        client.node.destroy_publisher(client.prompt_pub)
        client.wait(lambda: False, 2.0)
    finally:
        client.close()
        code = node.stop(signal.SIGTERM)
    text = node.text()
    assert code == 0, text
    assert "malformed DDS sample" not in text and "InvalidSample" not in text, text
    rejected = [line for line in text.splitlines() if "prompt rejected" in line]
    assert 1 <= len(rejected) <= 40, f"{len(rejected)} log lines for the flood"
    assert any("suppressed" in line for line in rejected)
    assert "Traceback" not in text
