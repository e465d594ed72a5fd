"""
The root resource: the JSON-method endpoint on its fast path, Klein for the rest.
"""

from __future__ import annotations

from typing import Any, List

from twisted.web.resource import IResource, Resource


class RootResource(Resource):
    """
    Sends requests for the API path straight to the API resource (no
    routing cost on the hot path) and every other request to the Klein
    routes.  Works both as a site's root and mounted under a path of a host
    application's site, because it matches the path left to traverse.
    """

    isLeaf = True

    def __init__(self, api_path: str, api: IResource, routes: IResource) -> None:
        super().__init__()
        self._api_segments: List[bytes] = api_path.encode("ascii").split(b"/")[1:]
        self._api = api
        self._routes = routes

    def render(self, request: Any) -> Any:
        if request.postpath == self._api_segments:
            return self._api.render(request)
        return self._routes.render(request)
