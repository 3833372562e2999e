"""ZeroMQ transport for non-ROS clients: multipart [JSON header, raw bytes], zero-copy, localhost by default.

Input (the node binds a SUB socket at ``zmq_input_endpoint``; clients connect a PUB):
    image:  [{"topic": "/carm/image", "stamp": [sec, nanosec], "frame_id": "", "height": H, "width": W,
              "encoding": "mono16", "is_bigendian": 0, "step": S}, <H*S bytes>]
    prompt: [{"topic": "/fluorosam/prompt", "data": "left lung; heart"}]
Output (the node binds a PUB at ``zmq_output_endpoint``; the first part is the topic, for SUB filtering):
    mask / overlay: [topic, header JSON as for images, <pixels>]
    detections:     [topic, results JSON (see FrameOutput.results_json)]
    diagnostics:    [topic, {"level": 0, "message": "ok", "name": ..., "values": {...}}]
Optional CURVE: the node's secret key file (``zmq.auth.create_certificates``) encrypts both sockets;
with ``zmq_curve_authorized_keys_dir`` only clients whose public key is in that folder get through.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import zmq

from fluorosam_ros.core import Diagnostics, FrameOutput, NodeCore
from fluorosam_ros.messages import Header, ImageMsg
from fluorosam_ros.params import NodeParams

log = logging.getLogger("fluorosam_node.zmq")
MAX_HEADER_BYTES = 64 * 1024


class MessageError(ValueError):
    """A ZeroMQ message that does not follow the documented multipart layout."""


def image_header(msg: ImageMsg, topic: str) -> dict:
    return {"topic": topic, "stamp": [msg.header.stamp_sec, msg.header.stamp_nanosec],
            "frame_id": msg.header.frame_id, "height": msg.height, "width": msg.width,
            "encoding": msg.encoding, "is_bigendian": int(msg.is_bigendian), "step": msg.step}


def encode_image(msg: ImageMsg, topic: str) -> list:
    """Multipart [JSON header, pixel buffer] for an image (the buffer is sent without copying)."""
    return [json.dumps(image_header(msg, topic)).encode(), msg.data]


def decode_header(part) -> dict:
    raw = bytes(part)
    if len(raw) > MAX_HEADER_BYTES:
        raise MessageError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MessageError(f"first part is not a JSON header: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("topic"), str):
        raise MessageError("header must be a JSON object with a string 'topic'")
    return header


def decode_image(header: dict, payload) -> ImageMsg:
    """ImageMsg from a header dict and the raw frame part; field types checked, pixels checked later."""
    try:
        stamp = header.get("stamp", [0, 0])
        sec, nanosec = (int(stamp[0]), int(stamp[1]))
        if not 0 <= nanosec < 1_000_000_000:
            raise MessageError(f"stamp nanosec {nanosec} out of range")
        fields = {name: header[name] for name in ("height", "width", "encoding", "step")}
    except KeyError as error:
        raise MessageError(f"image header lacks {error}") from None
    except (TypeError, ValueError, IndexError) as error:
        raise MessageError(f"image header stamp must be [sec, nanosec]: {error}") from None
    fields["is_bigendian"] = header.get("is_bigendian", 0)
    for name in ("height", "width", "step", "is_bigendian"):
        if not isinstance(fields[name], int) or isinstance(fields[name], bool):
            raise MessageError(f"image header '{name}' must be an integer, got {fields[name]!r}")
    if not isinstance(fields["encoding"], str):
        raise MessageError("image header 'encoding' must be a string")
    return ImageMsg(Header(sec, nanosec, str(header.get("frame_id", ""))), fields["height"], fields["width"],
                    fields["encoding"], fields["is_bigendian"], fields["step"], payload)


def _curve_server(socket: zmq.Socket, secret_key_file: str) -> None:
    from zmq.auth import load_certificate

    public, secret = load_certificate(secret_key_file)
    if secret is None:
        raise ValueError(f"{secret_key_file} holds no secret key (use the .key_secret file)")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


class ZmqTransport:
    """Feeds a NodeCore from a bound SUB socket and publishes its outputs on a bound PUB socket."""

    def __init__(self, params: NodeParams, context: zmq.Context | None = None) -> None:
        self.params = params
        self.context = context or zmq.Context.instance()
        self._authenticator = None
        if params.zmq_curve_authorized_keys_dir:
            if not params.zmq_curve_secret_key_file:
                raise ValueError("zmq_curve_authorized_keys_dir needs zmq_curve_secret_key_file")
            from zmq.auth.thread import ThreadAuthenticator

            self._authenticator = ThreadAuthenticator(self.context)
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=str(Path(params.zmq_curve_authorized_keys_dir)))
        self._pub_lock = threading.Lock()
        self.pub = self.context.socket(zmq.PUB)
        self.sub = self.context.socket(zmq.SUB)
        for socket in (self.pub, self.sub):
            socket.linger = 0
            if params.zmq_curve_secret_key_file:
                _curve_server(socket, params.zmq_curve_secret_key_file)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.rcvhwm = 4  # the core keeps only the newest frame anyway
        self.pub.bind(params.zmq_output_endpoint)
        self.sub.bind(params.zmq_input_endpoint)
        self.core: NodeCore | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------ outputs
    def _send(self, parts: list) -> None:
        with self._pub_lock:
            self.pub.send_multipart(parts, copy=False)

    def publish_output(self, output: FrameOutput) -> None:
        p = self.params
        self._send([p.mask_topic.encode(), *encode_image(output.mask, p.mask_topic)])
        self._send([p.detections_topic.encode(), output.results_json().encode()])
        if output.overlay is not None:
            self._send([p.overlay_topic.encode(), *encode_image(output.overlay, p.overlay_topic)])

    def publish_diagnostics(self, diagnostics: Diagnostics) -> None:
        body = {"level": diagnostics.level, "message": diagnostics.message, "name": diagnostics.name,
                "values": diagnostics.values}
        self._send([self.params.diagnostics_topic.encode(), json.dumps(body).encode()])

    # ------------------------------------------------------------------------------- inputs
    def handle(self, parts: list) -> None:
        """Route one multipart input message to the core; malformed ones are reported, never raised."""
        assert self.core is not None
        try:
            if not parts:
                raise MessageError("empty message")
            header = decode_header(parts[0])
            topic = header["topic"]
            if topic == self.params.image_topic:
                if len(parts) != 2:
                    raise MessageError(f"image message needs 2 parts [header, pixels], got {len(parts)}")
                self.core.submit_frame(decode_image(header, parts[1].buffer if hasattr(parts[1], "buffer")
                                                    else parts[1]))
            elif topic == self.params.prompt_topic:
                data = header.get("data")
                if data is None and len(parts) == 2:
                    data = bytes(parts[1]).decode("utf-8", errors="strict")
                if not isinstance(data, str):
                    raise MessageError("prompt message needs a string 'data' (or a UTF-8 second part)")
                self.core.set_prompts(data)
            else:
                raise MessageError(f"unknown topic {topic!r} (expected {self.params.image_topic!r} "
                                   f"or {self.params.prompt_topic!r})")
        except (MessageError, UnicodeDecodeError) as error:
            self.core.counts["malformed_messages"] += 1
            self.core.report_error(f"malformed zmq message: {error}")

    def spin(self, core: NodeCore) -> None:
        """Receive until :meth:`shutdown`; runs in the caller's thread."""
        self.core = core
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            self.handle(self.sub.recv_multipart(copy=False))

    def shutdown(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.pub.close(0)
        self.sub.close(0)
        if self._authenticator is not None:
            self._authenticator.stop()


class ZmqClient:
    """The other end: publishes frames and prompts to a node, receives its outputs (tests, demo, tools)."""

    def __init__(self, params: NodeParams, context: zmq.Context | None = None,
                 server_public_key: bytes | None = None, client_key_file: str | None = None) -> None:
        self.params = params
        self.context = context or zmq.Context.instance()
        self.pub = self.context.socket(zmq.PUB)
        self.sub = self.context.socket(zmq.SUB)
        for socket in (self.pub, self.sub):
            socket.linger = 0
            if server_public_key is not None:
                from zmq.auth import load_certificate

                public, secret = load_certificate(client_key_file) if client_key_file else zmq.curve_keypair()
                socket.curve_publickey, socket.curve_secretkey = public, secret
                socket.curve_serverkey = server_public_key
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.pub.connect(params.zmq_input_endpoint)
        self.sub.connect(params.zmq_output_endpoint)

    def send_frame(self, msg: ImageMsg) -> None:
        self.pub.send_multipart(encode_image(msg, self.params.image_topic), copy=False)

    def send_prompt(self, text: str) -> None:
        self.pub.send_multipart([json.dumps({"topic": self.params.prompt_topic, "data": text}).encode()])

    def send_raw(self, parts: list) -> None:
        self.pub.send_multipart(parts)

    def receive(self, timeout_s: float) -> tuple[str, dict, bytes | None] | None:
        """(topic, JSON part, pixel bytes or None) of the next output, or None after ``timeout_s``."""
        if not self.sub.poll(int(timeout_s * 1000)):
            return None
        parts = self.sub.recv_multipart()
        return parts[0].decode(), json.loads(parts[1]), (parts[2] if len(parts) > 2 else None)

    def close(self) -> None:
        self.pub.close(0)
        self.sub.close(0)
