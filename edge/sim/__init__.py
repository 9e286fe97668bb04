"""Simulation stand-ins for hardware (never imported on a real robot's path)."""
