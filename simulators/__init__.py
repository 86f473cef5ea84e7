"""Simulated peripherals, terminals and fleets (never imported by product packages)."""
