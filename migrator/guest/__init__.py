"""The microguest: its build, its serial protocol, and the controller's console on it."""
