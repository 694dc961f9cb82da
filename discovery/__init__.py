"""corral.discovery: zeroconf advertise (agent) and browse (desktop), and liveness. Qt-free."""
