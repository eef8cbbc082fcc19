"""HepatoAI, the one installed package: the services (common, gateway, worker: folders at
the top of the repository, linked here) and what runs them (cli, bench, client, devstack)."""
