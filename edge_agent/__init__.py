"""Edge agent: device sources, signing, durable outbox and MQTT uplink."""
