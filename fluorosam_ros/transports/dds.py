"""Cyclone DDS transport speaking the ROS 2 wire format, so ROS 2 nodes see the node without ROS here.

(No ``from __future__ import annotations`` here: cyclonedds resolves the IDL field types at runtime.)

ROS 2 (rmw_cyclonedds, rmw_fastrtps) maps a topic ``/a/b`` to the DDS topic ``rt/a/b`` and a message
``pkg/msg/Name`` to the DDS type ``pkg::msg::dds_::Name_``, serialised as plain (XCDR1) CDR. The structs
below mirror the ROS 2 message definitions field for field; a test checks their bytes against rosbags'
serializer. QoS as in the rclpy node: images best effort (sensor data) depth 1, prompts reliable +
transient local, outputs reliable depth ``output_qos_depth``.

Endpoints carry the REP-2016 type hash in USER_DATA (``typehash=RIHS01_...;``), as Jazzy's rmw layers do, so
ROS 2 tools see the node's types and rmw_cyclonedds peers parse them. Discovery follows ROS 2's own settings
(``ROS_DOMAIN_ID``, ``ROS_AUTOMATIC_DISCOVERY_RANGE``, ``ROS_STATIC_PEERS``; see :func:`ros_discovery_config`).

Large frames: a 1024x1024 mono16 frame is 2 MiB, i.e. ~1500 UDP fragments at Cyclone's defaults. Lost
fragments are only repaired after a heartbeat/NACK round (hundreds of ms), so :func:`cyclone_config`
raises the fragment size to 60 kB UDP datagrams and the socket buffers to 8-32 MiB. Set CYCLONEDDS_URI
yourself to override; :func:`loopback_config` is the LOCALHOST configuration (loopback only, no multicast).
"""

import logging
import os
import struct
import threading
from dataclasses import dataclass

from cyclonedds.idl import IdlStruct
from cyclonedds.idl._support import Endianness
from cyclonedds.idl.types import array, byte, float64, int32, sequence, uint8, uint32

from fluorosam_ros.core import Detection, Diagnostics, FrameOutput, NodeCore
from fluorosam_ros.messages import Header, ImageMsg
from fluorosam_ros.params import NodeParams

log = logging.getLogger("fluorosam_node.dds")


# --------------------------------------------------------------------------------- ROS 2 message types
def _cdr_align(out: bytearray, alignment: int) -> None:
    out += b"\x00" * (-(len(out) - 4) % alignment)


def _cdr_read_string(raw: memoryview, pos: int) -> tuple[str, int]:
    pos += -(pos - 4) % 4
    (length,) = struct.unpack_from("<I", raw, pos)
    if length < 1 or pos + 4 + length > len(raw):
        raise ValueError(f"CDR string of length {length} does not fit")
    return bytes(raw[pos + 4: pos + 3 + length]).decode("utf-8"), pos + 4 + length


def _cdr_string(out: bytearray, text: str) -> None:
    encoded = text.encode("utf-8") + b"\x00"
    _cdr_align(out, 4)
    out += struct.pack("<I", len(encoded))
    out += encoded


@dataclass
class Time_(IdlStruct, typename="builtin_interfaces::msg::dds_::Time_"):
    sec: int32 = 0
    nanosec: uint32 = 0


@dataclass
class Header_(IdlStruct, typename="std_msgs::msg::dds_::Header_"):
    stamp: Time_ = None
    frame_id: str = ""


@dataclass
class String_(IdlStruct, typename="std_msgs::msg::dds_::String_"):
    data: str = ""


@dataclass
class Image_(IdlStruct, typename="sensor_msgs::msg::dds_::Image_"):
    header: Header_ = None
    height: uint32 = 0
    width: uint32 = 0
    encoding: str = ""
    is_bigendian: uint8 = 0
    step: uint32 = 0
    data: sequence[uint8] = b""

    def serialize(self, buffer=None, endianness=None, use_version_2=None) -> bytes:
        """Plain little-endian CDR in one join: cyclonedds' generic path costs ~100 ms per 2 MiB frame."""
        if buffer is not None or use_version_2 or (endianness is not None and endianness != Endianness.Little):
            return super().serialize(buffer=buffer, endianness=endianness, use_version_2=use_version_2)
        head = bytearray(b"\x00\x01\x00\x00")  # XCDR1 little endian; alignment counts from after it
        head += struct.pack("<iI", self.header.stamp.sec, self.header.stamp.nanosec)
        _cdr_string(head, self.header.frame_id)
        _cdr_align(head, 4)
        head += struct.pack("<II", self.height, self.width)
        _cdr_string(head, self.encoding)
        head += struct.pack("<B", self.is_bigendian)
        _cdr_align(head, 4)
        head += struct.pack("<II", self.step, len(self.data))
        return b"".join((head, self.data))

    @classmethod
    def deserialize(cls, data, has_header: bool = True, use_version_2=None) -> "Image_":
        """Little-endian plain CDR parsed directly, ``data`` kept as bytes (the generic path builds a list of ints)."""
        raw = memoryview(data).cast("B")
        if not has_header or use_version_2 or bytes(raw[:2]) != b"\x00\x01":
            try:
                sample = super().deserialize(data, has_header=has_header, use_version_2=use_version_2)
                sample.data = bytes(sample.data)
            except Exception as error:  # noqa: BLE001  (the generic decoder raises many kinds on bad bytes)
                raise ValueError(f"malformed sensor_msgs/Image CDR: {type(error).__name__}: {error}") from None
            return sample
        try:
            sec, nanosec = struct.unpack_from("<iI", raw, 4)
            frame_id, pos = _cdr_read_string(raw, 12)
            pos += -(pos - 4) % 4
            height, width = struct.unpack_from("<II", raw, pos)
            encoding, pos = _cdr_read_string(raw, pos + 8)
            is_bigendian = raw[pos]
            pos += 1 + (-(pos + 1 - 4) % 4)
            step, size = struct.unpack_from("<II", raw, pos)
        except (struct.error, IndexError, UnicodeDecodeError) as error:
            raise ValueError(f"truncated or malformed sensor_msgs/Image CDR: {error}") from None
        if pos + 8 + size > len(raw):
            raise ValueError(f"sensor_msgs/Image CDR announces {size} data bytes, {len(raw) - pos - 8} present")
        return cls(Header_(Time_(sec, nanosec), frame_id), height, width, encoding, is_bigendian, step,
                   bytes(raw[pos + 8: pos + 8 + size]))


@dataclass
class Point_(IdlStruct, typename="geometry_msgs::msg::dds_::Point_"):
    x: float64 = 0.0
    y: float64 = 0.0
    z: float64 = 0.0


@dataclass
class Quaternion_(IdlStruct, typename="geometry_msgs::msg::dds_::Quaternion_"):
    x: float64 = 0.0
    y: float64 = 0.0
    z: float64 = 0.0
    w: float64 = 1.0


@dataclass
class Pose_(IdlStruct, typename="geometry_msgs::msg::dds_::Pose_"):
    position: Point_ = None
    orientation: Quaternion_ = None


@dataclass
class PoseWithCovariance_(IdlStruct, typename="geometry_msgs::msg::dds_::PoseWithCovariance_"):
    pose: Pose_ = None
    covariance: array[float64, 36] = None


@dataclass
class Point2D_(IdlStruct, typename="vision_msgs::msg::dds_::Point2D_"):
    x: float64 = 0.0
    y: float64 = 0.0


@dataclass
class Pose2D_(IdlStruct, typename="vision_msgs::msg::dds_::Pose2D_"):
    position: Point2D_ = None
    theta: float64 = 0.0


@dataclass
class BoundingBox2D_(IdlStruct, typename="vision_msgs::msg::dds_::BoundingBox2D_"):
    center: Pose2D_ = None
    size_x: float64 = 0.0
    size_y: float64 = 0.0


@dataclass
class ObjectHypothesis_(IdlStruct, typename="vision_msgs::msg::dds_::ObjectHypothesis_"):
    class_id: str = ""
    score: float64 = 0.0


@dataclass
class ObjectHypothesisWithPose_(IdlStruct, typename="vision_msgs::msg::dds_::ObjectHypothesisWithPose_"):
    hypothesis: ObjectHypothesis_ = None
    pose: PoseWithCovariance_ = None


@dataclass
class Detection2D_(IdlStruct, typename="vision_msgs::msg::dds_::Detection2D_"):
    header: Header_ = None
    results: sequence[ObjectHypothesisWithPose_] = None
    bbox: BoundingBox2D_ = None
    id: str = ""


@dataclass
class Detection2DArray_(IdlStruct, typename="vision_msgs::msg::dds_::Detection2DArray_"):
    header: Header_ = None
    detections: sequence[Detection2D_] = None


@dataclass
class KeyValue_(IdlStruct, typename="diagnostic_msgs::msg::dds_::KeyValue_"):
    key: str = ""
    value: str = ""


@dataclass
class DiagnosticStatus_(IdlStruct, typename="diagnostic_msgs::msg::dds_::DiagnosticStatus_"):
    level: byte = 0
    name: str = ""
    message: str = ""
    hardware_id: str = ""
    values: sequence[KeyValue_] = None


@dataclass
class DiagnosticArray_(IdlStruct, typename="diagnostic_msgs::msg::dds_::DiagnosticArray_"):
    header: Header_ = None
    status: sequence[DiagnosticStatus_] = None


# ----------------------------------------------------------------------------------------- conversions
def header_to_dds(header: Header) -> Header_:
    return Header_(Time_(int(header.stamp_sec), int(header.stamp_nanosec)), header.frame_id)


def image_to_dds(msg: ImageMsg) -> Image_:
    return Image_(header_to_dds(msg.header), msg.height, msg.width, msg.encoding, int(msg.is_bigendian), msg.step,
                  bytes(msg.data))


def image_from_dds(sample: Image_) -> ImageMsg:
    h = sample.header
    return ImageMsg(Header(h.stamp.sec, h.stamp.nanosec, h.frame_id), sample.height, sample.width, sample.encoding,
                    sample.is_bigendian, sample.step, sample.data)


def _detection_to_dds(header: Header_, d: Detection) -> Detection2D_:
    """Same mapping as :mod:`fluorosam_ros.ros_types` (documented there)."""
    nan = float("nan")
    cx, cy = d.centroid if d.centroid is not None else (nan, nan)
    pose = PoseWithCovariance_(Pose_(Point_(cx, cy, float(d.area)), Quaternion_()), [0.0] * 36)
    if d.bbox is not None:
        x0, y0, x1, y1 = d.bbox
        centre, size = ((x0 + x1) / 2.0, (y0 + y1) / 2.0), (float(x1 - x0 + 1), float(y1 - y0 + 1))
    else:
        centre, size = (0.0, 0.0), (0.0, 0.0)
    results = [ObjectHypothesisWithPose_(ObjectHypothesis_(d.prompt, float(d.score)), pose)]
    if d.tip is not None:
        tip = PoseWithCovariance_(Pose_(Point_(float(d.tip[0]), float(d.tip[1]), 0.0), Quaternion_()), [0.0] * 36)
        results.append(ObjectHypothesisWithPose_(ObjectHypothesis_("tip", float(d.score)), tip))
    return Detection2D_(header, results,
                        BoundingBox2D_(Pose2D_(Point2D_(*centre), 0.0), *size),
                        f"{d.label}:{d.reason}" if d.refused else str(d.label))


def detections_to_dds(output: FrameOutput) -> Detection2DArray_:
    header = header_to_dds(output.header)
    return Detection2DArray_(header, [_detection_to_dds(header, d) for d in output.detections])


def diagnostics_to_dds(diagnostics: Diagnostics, stamp_ns: int) -> DiagnosticArray_:
    status = DiagnosticStatus_(int(diagnostics.level), diagnostics.name, diagnostics.message,
                               diagnostics.hardware_id, [KeyValue_(k, v) for k, v in diagnostics.values.items()])
    return DiagnosticArray_(header_to_dds(Header.from_ns(stamp_ns)), [status])


def ros_topic(name: str) -> str:
    """ROS 2 topic name -> DDS topic name (``/carm/image`` -> ``rt/carm/image``)."""
    if not name.startswith("/"):
        raise ValueError(f"DDS transport needs absolute topic names, got {name!r}")
    return "rt" + name


# ------------------------------------------------------------------------------------------ configuration
LARGE_FRAME_SETTINGS = ("<Internal><SocketReceiveBufferSize min=\"default\" max=\"32MB\"/>"
                        "<SocketSendBufferSize min=\"default\" max=\"8MB\"/>"
                        "<Watermarks><WhcHigh>32MB</WhcHigh></Watermarks></Internal>")


def cyclone_config(domain_id: int, interface: str | None = None, multicast: bool = True,
                   peers: tuple[str, ...] = ()) -> str:
    """CYCLONEDDS_URI XML with large-frame settings; ``interface`` pins the network (e.g. 'lo'); without
    multicast, participants are found only at ``peers`` (unicast discovery)."""
    net = f'<Interfaces><NetworkInterface name="{interface}"/></Interfaces>' if interface else ""
    general = (f"<General>{net}{'' if multicast else '<AllowMulticast>false</AllowMulticast>'}"
               "<MaxMessageSize>65500B</MaxMessageSize><FragmentSize>60000B</FragmentSize></General>")
    peer_xml = "".join(f'<Peer address="{peer}"/>' for peer in peers)
    discovery = "" if multicast and not peers else (
        "<Discovery><ParticipantIndex>auto</ParticipantIndex><MaxAutoParticipantIndex>30</MaxAutoParticipantIndex>"
        f"<Peers>{peer_xml}</Peers></Discovery>")
    return f'<CycloneDDS><Domain id="{domain_id}">{general}{discovery}{LARGE_FRAME_SETTINGS}</Domain></CycloneDDS>'


def loopback_config(domain_id: int) -> str:
    """Loopback only, no multicast (ROS 2's LOCALHOST range): tests use it so they never touch the network."""
    return cyclone_config(domain_id, interface="lo", multicast=False, peers=("127.0.0.1",))


DISCOVERY_RANGES = ("SUBNET", "LOCALHOST", "OFF", "SYSTEM_DEFAULT")


def ros_discovery_config(domain_id: int, environ=os.environ) -> str:
    """The configuration ROS 2's rmw layers derive from ``ROS_AUTOMATIC_DISCOVERY_RANGE`` and
    ``ROS_STATIC_PEERS`` (';'-separated): LOCALHOST stays on loopback without multicast, SUBNET (the
    default) multicasts on the network, OFF finds only the static peers, SYSTEM_DEFAULT leaves discovery to
    Cyclone's defaults. Static peers are added to any range but SYSTEM_DEFAULT."""
    discovery_range = (environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") or "SUBNET").strip().upper()
    if discovery_range not in DISCOVERY_RANGES:
        raise ValueError(f"ROS_AUTOMATIC_DISCOVERY_RANGE={discovery_range!r}; expected one of {DISCOVERY_RANGES}")
    static = tuple(peer.strip() for peer in environ.get("ROS_STATIC_PEERS", "").split(";") if peer.strip())
    if discovery_range == "LOCALHOST":
        return cyclone_config(domain_id, interface="lo", multicast=False, peers=("127.0.0.1",) + static)
    if discovery_range == "OFF":
        return cyclone_config(domain_id, multicast=False, peers=static)
    if discovery_range == "SYSTEM_DEFAULT":
        return cyclone_config(domain_id)
    return cyclone_config(domain_id, peers=static) if static else cyclone_config(domain_id)


def resolve_domain_id(configured: int, environ=os.environ) -> int:
    """``dds_domain_id`` >= 0 wins; -1 (the default) follows ``ROS_DOMAIN_ID`` as ROS 2 nodes do (else 0)."""
    if configured >= 0:
        return configured
    text = environ.get("ROS_DOMAIN_ID", "").strip()
    if not text:
        return 0
    if not text.isdigit() or not 0 <= int(text) <= 232:
        raise ValueError(f"ROS_DOMAIN_ID={text!r} is not a domain id in 0..232")
    return int(text)


def ensure_config(domain_id: int) -> None:
    """Set CYCLONEDDS_URI from ROS 2's discovery settings unless the user set one (read at participant
    creation)."""
    os.environ.setdefault("CYCLONEDDS_URI", ros_discovery_config(domain_id))


# ---------------------------------------------------------------------------------------------- endpoints
ROS_TYPE_NAMES = {"Image_": "sensor_msgs/msg/Image", "String_": "std_msgs/msg/String",
                  "Detection2DArray_": "vision_msgs/msg/Detection2DArray",
                  "DiagnosticArray_": "diagnostic_msgs/msg/DiagnosticArray"}


def type_hash_user_data(struct: type) -> bytes:
    """USER_DATA of an endpoint of ``struct``'s topic, as rmw_dds_common encodes it for Jazzy."""
    from fluorosam_ros.ros_types import type_hash

    return f"typehash={type_hash(ROS_TYPE_NAMES[struct.__name__])};".encode()


def _qos(struct: type, reliable: bool, depth: int, transient_local: bool = False):
    from cyclonedds.core import Policy, Qos
    from cyclonedds.util import duration

    policies = [Policy.Reliability.Reliable(duration(seconds=1)) if reliable else Policy.Reliability.BestEffort,
                Policy.History.KeepLast(depth),
                Policy.Durability.TransientLocal if transient_local else Policy.Durability.Volatile,
                Policy.DataRepresentation(use_cdrv0_representation=True),  # plain CDR, as ROS 2 speaks
                Policy.Userdata(type_hash_user_data(struct))]
    return Qos(*policies)


def _endpoint(kind, participant, topic: str, struct: type, reliable: bool, depth: int,
              transient_local: bool = False):
    """A DataReader / DataWriter on ROS 2 topic ``topic`` with ROS 2's QoS conventions and type hash."""
    from cyclonedds.topic import Topic

    return kind(participant, Topic(participant, ros_topic(topic), struct),
                qos=_qos(struct, reliable, depth, transient_local))


class DdsTransport:
    """Subscribes the image and prompt topics, publishes mask, detections, results, overlay and diagnostics."""

    def __init__(self, params: NodeParams) -> None:
        domain_id = resolve_domain_id(params.dds_domain_id)
        ensure_config(domain_id)
        from cyclonedds.domain import DomainParticipant
        from cyclonedds.pub import DataWriter
        from cyclonedds.sub import DataReader

        self.params = params
        self.participant = dp = DomainParticipant(domain_id)
        out, depth = params.output_qos_depth, params.image_qos_depth
        self.image_reader = _endpoint(DataReader, dp, params.image_topic, Image_,
                                      params.image_qos_reliability == "reliable", depth)
        self.prompt_reader = _endpoint(DataReader, dp, params.prompt_topic, String_, True, params.prompt_qos_depth,
                                       transient_local=True)
        self.mask_writer = _endpoint(DataWriter, dp, params.mask_topic, Image_, True, out)
        self.overlay_writer = _endpoint(DataWriter, dp, params.overlay_topic, Image_, True, out)
        self.detections_writer = _endpoint(DataWriter, dp, params.detections_topic, Detection2DArray_, True, out)
        self.results_writer = _endpoint(DataWriter, dp, params.results_topic, String_, True, out)
        self.diagnostics_writer = _endpoint(DataWriter, dp, params.diagnostics_topic, DiagnosticArray_, True, out)
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def publish_output(self, output: FrameOutput) -> None:
        with self._lock:
            self.mask_writer.write(image_to_dds(output.mask))
            self.detections_writer.write(detections_to_dds(output))
            self.results_writer.write(String_(output.results_json()))
            if output.overlay is not None:
                self.overlay_writer.write(image_to_dds(output.overlay))

    def publish_diagnostics(self, diagnostics: Diagnostics) -> None:
        import time

        with self._lock:
            self.diagnostics_writer.write(diagnostics_to_dds(diagnostics, time.time_ns()))

    def spin(self, core: NodeCore) -> None:
        """Wait on both readers until :meth:`shutdown`; prompts are applied before frames of the same wake-up."""
        from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
        from cyclonedds.internal import InvalidSample
        from cyclonedds.util import duration

        waitset = WaitSet(self.participant)
        any_sample = SampleState.Any | ViewState.Any | InstanceState.Any
        for reader in (self.prompt_reader, self.image_reader):
            waitset.attach(ReadCondition(reader, any_sample))
        while not self._stop.is_set():
            waitset.wait(duration(milliseconds=100))
            try:
                for sample in self.prompt_reader.take(N=16):
                    if not isinstance(sample, InvalidSample):  # a writer left (dispose/unregister): no data
                        core.set_prompts(sample.data)
                for sample in self.image_reader.take(N=16):
                    if not isinstance(sample, InvalidSample):
                        core.submit_frame(image_from_dds(sample))
            except Exception as error:  # noqa: BLE001  (an undecodable sample must not stop the node)
                core.counts["malformed_messages"] += 1
                core.report_error(f"malformed DDS sample: {type(error).__name__}: {error}")

    def shutdown(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.participant = None


class DdsClient:
    """The other end (tests, demo): publishes frames and prompts, reads the node's outputs."""

    def __init__(self, params: NodeParams) -> None:
        domain_id = resolve_domain_id(params.dds_domain_id)
        ensure_config(domain_id)
        from cyclonedds.domain import DomainParticipant
        from cyclonedds.pub import DataWriter
        from cyclonedds.sub import DataReader

        self.params = params
        dp = self.participant = DomainParticipant(domain_id)
        out = params.output_qos_depth
        self.image_writer = _endpoint(DataWriter, dp, params.image_topic, Image_,
                                      params.image_qos_reliability == "reliable", params.image_qos_depth)
        self.prompt_writer = _endpoint(DataWriter, dp, params.prompt_topic, String_, True, params.prompt_qos_depth,
                                       transient_local=True)
        self.mask_reader = _endpoint(DataReader, dp, params.mask_topic, Image_, True, out)
        self.overlay_reader = _endpoint(DataReader, dp, params.overlay_topic, Image_, True, out)
        self.results_reader = _endpoint(DataReader, dp, params.results_topic, String_, True, out)
        self.detections_reader = _endpoint(DataReader, dp, params.detections_topic, Detection2DArray_, True, out)
        self.diagnostics_reader = _endpoint(DataReader, dp, params.diagnostics_topic, DiagnosticArray_, True, out)

    def send_frame(self, msg: ImageMsg) -> None:
        self.image_writer.write(image_to_dds(msg))

    def send_prompt(self, text: str) -> None:
        self.prompt_writer.write(String_(text))
