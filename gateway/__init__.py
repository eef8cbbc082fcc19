"""The HTTP gateway: accepts images, records jobs, answers status."""
