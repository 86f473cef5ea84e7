"""Broker access control derived from the ledger: mosquitto password file, ACL, and the TLS config template."""

from pathlib import Path

SECURE_CONF_TEMPLATE = Path(__file__).resolve().parent / "mosquitto-secure.conf"
