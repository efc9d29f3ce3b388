"""The memory estimate: the real setup and step traced on the meta device (`sdlora fit`)."""
