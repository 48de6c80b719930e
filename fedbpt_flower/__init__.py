"""FedBPT as a Flower app: the native strategies and client round hosted by Flower's ServerApp and ClientApp.

Nothing here re-implements the math: the ServerApp drives `aggregator.strategies` and the ClientApp calls
`fed_clients.client.FedBPTClient.run_round`; this package only maps them onto Flower's messages, sampling,
timeouts and configuration (docs/flower.md).
"""
