"""Terminal and web front ends for the assistant."""
