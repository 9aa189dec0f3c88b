"""Launching: `tools/launch.py` (cli), config layering with cluster profiles (resolve), login-node checks
(checks), the submitit job with the stop/requeue protocol (job), submission and waiting (submit)."""
