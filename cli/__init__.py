"""The `peer` command: main.py (join, status, leave, identity, swarm, doctor), render.py (`peer
status` tables), swarm.py (`peer swarm`: a run seen from any machine, without a daemon), doctor.py
(`peer doctor`: what is wrong with this machine's setup, and the fix)."""
