"""Ranks and what connects them.

Holds the rank arithmetic (``topology``), the process groups built from it (``groups``),
rank discovery under every launcher and the device/backend choice (``init``), the
collectives the MoE path uses (``comm``), gradient reduction and clipping for dense and
expert parameters (``grads``), the phase tracker and hang watchdog (``phase``), local
process spawning (``spawn``) and local launch with signal forwarding (``launch``,
``moe-train launch``).

May import: nothing else of moe_train (the bottom of the house, beside ``data``).
"""
