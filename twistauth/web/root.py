"""
The root resource: the JSON-method endpoint on its fast path, Klein for the rest.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from twisted.web.resource import IResource, Resource


class RootResource(Resource):
    """
    Sends requests for a few exact paths (the JSON endpoint, the logout
    long-polls) straight to their resources (no routing cost on the hot
    path) and every other request to the Klein routes.  Works both as a site's root and mounted under a path of a host
    application's site, because it matches the path left to traverse.
    """

    isLeaf = True

    def __init__(self, fast: Mapping[str, IResource], routes: IResource) -> None:
        """
        :param fast: resources served at exact paths without routing (the
            JSON endpoint, the long-polls), by path.
        :param routes: everything else.
        """
        super().__init__()
        self._fast: Dict[Tuple[bytes, ...], IResource] = {
            tuple(path.encode("ascii").split(b"/")[1:]): resource for path, resource in fast.items()
        }
        self._routes = routes

    def render(self, request: Any) -> Any:
        resource = self._fast.get(tuple(request.postpath))
        if resource is not None:
            return resource.render(request)
        return self._routes.render(request)
