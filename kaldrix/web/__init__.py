"""The browser side of kaldrix: the landing page, the debug panel and the browser client.

Everything here is plain HTML, CSS and JavaScript modules shipped inside the package and
served by the gateway itself (no build step, no CDN, works offline):

- ``/`` what this server is, with links to the other pages;
- ``/debug`` the debug panel;
- ``/kaldrix.js`` the browser client, a dependency-free ES module.
"""

from ._assets import CONTENT_SECURITY_POLICY, CONTENT_TYPES, Asset, load_asset, protocol_text, readme_text
from ._routes import STATIC_FILES, WEB_ROUTES, landing_links, render_landing

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "CONTENT_TYPES",
    "STATIC_FILES",
    "WEB_ROUTES",
    "Asset",
    "landing_links",
    "load_asset",
    "protocol_text",
    "readme_text",
    "render_landing",
]
