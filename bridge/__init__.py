"""vela-bridge: a durable forwarding proxy from GitHub webhooks to Vela's REST API."""

__version__ = "0.1.0"
