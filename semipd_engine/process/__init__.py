"""The process driver: any topology as worker processes behind one engine client."""
