"""Whether the Ray cluster a sweep names answers, checked before anything is written: `ray.init` on an address
where no Ray listens retries "Failed to connect to GCS" for a minute or more, after the run directory was
created. A TCP connect to the address (the Ray Client port of a `ray://` address), then, for a GCS address,
the GCS's own answers within PROBE_SECONDS each: a port where something else listens (a proxy, a web server)
fails them. The first answer is HTTP/2's (the GCS speaks gRPC, so it answers the HTTP/2 connection preface with
a SETTINGS frame; plain sockets, no extra package); where `grpcio` is installed (Ray's `default` extra), one
gRPC call of the GCS's own (GetClusterId) follows."""

from __future__ import annotations

import socket

from bench.errors import BenchError

PROBE_SECONDS = 5.0


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `ray://host:port`; None for `auto` and `local` (Ray resolves those)."""
    text = address.strip()
    if text in ("auto", "local"):
        return None
    bare = text.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BenchError(f"ray.address={address!r} is not host:port (e.g. ray.address=10.0.0.5:6379, or "
                         f"ray://10.0.0.5:10001 for Ray Client); fix it or drop it to run locally")
    return host, int(port)


def check_ray_address(address: str | None, timeout: float = PROBE_SECONDS) -> None:
    """One line, within `timeout` seconds, when nothing answers at the cluster's address."""
    if not address:
        return
    target = split_address(str(address))
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
        if not str(address).strip().startswith("ray://"):
            why = _http2_answer(target, timeout) or _gcs_answer(f"{target[0]}:{target[1]}", timeout)
            if why is None:
                return
    except socket.gaierror as err:
        why = f"unknown host ({err.strerror})"
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except OSError as err:
        why = err.strerror or type(err).__name__
    raise BenchError(f"ray.address={address}: no Ray cluster answers there ({why}); start the cluster (ray start "
                     f"--head) or fix the address, or drop ray.address to run on this machine")


# RFC 9113 section 3.4: the client connection preface, then an empty SETTINGS frame (length 0, type 0x4, no flags,
# stream 0). Every HTTP/2 server's first frame in reply is its own SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _http2_answer(target: tuple[str, int], timeout: float) -> str | None:
    """None where the listener answers the HTTP/2 preface with a SETTINGS frame (as a gRPC server does), else why
    not."""
    frame = b""
    try:
        with socket.create_connection(target, timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(_HTTP2_PREFACE)
            while len(frame) < 9:
                chunk = conn.recv(9 - len(frame))
                if not chunk:
                    break
                frame += chunk
    except TimeoutError:
        return f"something else listens on that port: no HTTP/2 answer within {timeout:g} s"
    except OSError as err:
        return f"something else listens on that port: {err.strerror or type(err).__name__}"
    if len(frame) == 9 and frame[3] == 0x4:
        return None
    return "something else listens on that port: it does not speak gRPC" if frame else \
        "something else listens on that port: it hung up"


def _gcs_answer(target: str, timeout: float) -> str | None:
    """None where a Ray GCS answers GetClusterId at `target` (any answer but "no such service" or silence:
    a cluster that asks for a token answers too), else why not."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return None  # nothing to ask with: ray.init will say
    with grpc.insecure_channel(target) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                return f"something else listens on that port: {code.name.lower()}"
    return None
