"""The engine core, with no torch and no clock of its own: requests, the scheduler and its policies, the block
allocator, one iteration (`EngineCore`), and the hand-offs by which a request leaves one worker for another."""
