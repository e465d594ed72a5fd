"""
The root resource: the JSON-method endpoint on its fast path, Klein for the rest.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from twisted.web.resource import IResource, Resource

from twistauth.observe import RequestIds


class RootResource(Resource):
    """
    Sends requests for a few exact paths (the JSON endpoint, the logout
    long-polls, the health and metrics endpoints) straight to their
    resources (no routing cost on the hot path) and every other request to
    the Klein routes.  Works both as a site's root and mounted under a path
    of a host application's site, because it matches the path left to
    traverse.

    Every request it renders first gets its id (`RequestIds.assign`: the
    ``X-Request-Id`` response header, and the id later log events of the
    request carry), whichever resource answers it, errors included.
    """

    isLeaf = True

    def __init__(
        self,
        fast: Mapping[str, IResource],
        routes: IResource,
        *,
        request_ids: Optional[RequestIds] = None,
    ) -> None:
        """
        :param fast: resources served at exact paths without routing (the
            JSON endpoint, the long-polls), by path.
        :param routes: everything else.
        :param request_ids: gives each request its id; ``None``: no ids.
        """
        super().__init__()
        self._fast: Dict[Tuple[bytes, ...], IResource] = {
            tuple(path.encode("ascii").split(b"/")[1:]): resource for path, resource in fast.items()
        }
        self._routes = routes
        self._assign = request_ids.assign if request_ids is not None else None

    def render(self, request: Any) -> Any:
        assign = self._assign
        if assign is not None:
            assign(request)
        resource = self._fast.get(tuple(request.postpath))
        if resource is not None:
            return resource.render(request)
        return self._routes.render(request)
