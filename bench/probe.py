"""Whether the Ray cluster a sweep names answers, checked before anything is written: `ray.init` on an address
where no Ray listens retries "Failed to connect to GCS" for a minute or more, after the run directory was
created. A TCP connect to the address (the Ray Client port of a `ray://` address), then, for a GCS address,
one gRPC call of the GCS's own (GetClusterId) answer within PROBE_SECONDS each: a port where something else
listens (a proxy, a web server) fails the second."""

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
            why = _gcs_answer(f"{target[0]}:{target[1]}", timeout)
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
