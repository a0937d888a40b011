"""Meshes and sharding rules, multi-process start-up, and the compile check for a target mesh."""
