"""Development tooling, apart from the production path: the embedded stack, the demo,
the VaBus emulator and a results query."""
