"""The cloud-hypervisor-compatible REST API: routes under ``/api/v1/`` -> :class:`VmController`.

Bodies and statuses follow cloud-hypervisor's OpenAPI description (``tests/data/
cloud-hypervisor-api.yaml``) for the implemented subset.  Errors are answered with a one-line
``text/plain`` message: 400 for a body hyperpy cannot accept (unknown or unsupported field,
malformed JSON), 404 for an action on a VM that does not exist, 405 for an action the VM's state
does not allow (as the spec says for pause, resume, shutdown, reboot and power-button), 409 for
``vm.create`` over an existing VM and ``vm.boot`` of a booted one, 500 when the VMM fails.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

from .http import Request, Response

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"


def _json(status: int, obj) -> Response:
    return Response(status, json.dumps(obj).encode())


class ApiServer:
    """Routes requests to ``controller``; ``on_vmm_shutdown`` is called (after the reply is
    queued) when a client asks the VMM to exit."""

    def __init__(self, controller, on_vmm_shutdown: Callable[[], None]) -> None:
        self.controller = controller
        self.on_vmm_shutdown = on_vmm_shutdown
        c = controller
        # path -> (method, action taking the request and returning a Response)
        self.routes: dict[str, tuple[str, Callable[[Request], Response]]] = {
            "vmm.ping": ("GET", self._ping),
            "vmm.shutdown": ("PUT", self._vmm_shutdown),
            "vm.create": ("PUT", self._create),
            "vm.boot": ("PUT", self._no_body(c.boot)),
            "vm.info": ("GET", self._info),
            "vm.counters": ("GET", self._counters),
            "vm.pause": ("PUT", self._no_body(c.pause)),
            "vm.resume": ("PUT", self._no_body(c.resume)),
            "vm.shutdown": ("PUT", self._no_body(c.shutdown)),
            "vm.reboot": ("PUT", self._no_body(c.reboot)),
            "vm.power-button": ("PUT", self._no_body(c.power_button)),
            "vm.delete": ("PUT", self._no_body(c.delete)),
        }

    def __call__(self, req: Request) -> Response:
        from ..errors import HyperpyError
        from .controller import ApiStateError
        from .vmconfig import ApiConfigError

        path = req.path
        if not path.startswith(API_PREFIX):
            return Response.text(404, f"no such path {path[:80]!r} (the API is under {API_PREFIX})")
        route = self.routes.get(path[len(API_PREFIX):])
        if route is None:
            return Response.text(404, f"no such endpoint {path[:80]!r} "
                                 f"(hyperpy implements: {', '.join(self.routes)})")
        method, action = route
        if req.method != method and not (method == "GET" and req.method == "HEAD"):
            return Response.text(405, f"{path} takes {method}, not {req.method[:10]}", Allow=method)
        try:
            return action(req)
        except ApiStateError as e:
            return Response.text(e.status, str(e))
        except ApiConfigError as e:
            return Response.text(400, str(e))
        except HyperpyError as e:
            log.error("%s failed: %s", path, e)
            return Response.text(500, str(e))

    # --- endpoints ------------------------------------------------------------------------
    def _no_body(self, op: Callable[[], None]) -> Callable[[Request], Response]:
        def action(req: Request) -> Response:
            if req.body.strip():
                return Response.text(400, f"{req.path} takes no body (got {len(req.body)} bytes)")
            op()
            return Response(204)
        return action

    def _ping(self, req: Request) -> Response:
        from .. import __version__

        return _json(200, {"build_version": f"hyperpy {__version__}", "version": __version__,
                           "pid": os.getpid(), "features": ["kvm", "virtio-iommu"]})

    def _vmm_shutdown(self, req: Request) -> Response:
        # Reply first, then stop: the client sees the 204 before the socket goes away.
        return Response(204, after=self.on_vmm_shutdown)

    def _create(self, req: Request) -> Response:
        from .vmconfig import ApiConfigError, from_json

        # Any Content-Type is read as JSON (curl -d sends x-www-form-urlencoded).
        if not req.body.strip():
            return Response.text(400, "vm.create: the body must be a VmConfig JSON object (got none)")
        try:
            body = json.loads(req.body)
        except (ValueError, RecursionError) as e:
            return Response.text(400, f"vm.create: the body is not valid JSON ({str(e)[:100]})")
        try:
            cfg = from_json(body)
        except RecursionError:
            raise ApiConfigError("vm.create: the body is nested too deeply") from None
        self.controller.create(cfg)
        return Response(204)

    def _info(self, req: Request) -> Response:
        from .vmconfig import to_json

        cfg, state = self.controller.info()
        return _json(200, {"config": to_json(cfg), "state": state,
                           "memory_actual_size": cfg.memory.size})

    def _counters(self, req: Request) -> Response:
        return _json(200, self.controller.counters())
