"""Stand-in for the LyCORIS package, so Merge LoRA's "is lycoris installed" check passes in tests."""
