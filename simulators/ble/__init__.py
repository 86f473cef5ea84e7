"""Virtual Bluetooth LE health devices on a bumble virtual link, and a bleak backend that reaches them.

`VirtualFleet` starts them; its `backend` goes to `edge_agent.sources.ble.BleSource(backend=…)`. Nothing
in the product imports this package: on a Pi the same source runs on bleak's BlueZ backend.
"""

from simulators.ble.bleak_backend import BumbleClient, BumbleScanner, bumble_backend
from simulators.ble.fleet import VirtualFleet
from simulators.ble.peripherals import Emission, VirtualPeripheral
from simulators.ble.radio import VirtualRadio

__all__ = ["BumbleClient", "BumbleScanner", "Emission", "VirtualFleet", "VirtualPeripheral", "VirtualRadio",
           "bumble_backend"]
