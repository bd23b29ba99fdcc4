"""The edge runtime: everything that runs on a phone, and nothing that needs TensorFlow.

Modules, one concept each (pure policy apart from I/O):
    store          the typed text, kept on the device in SQLite with a retention policy
    device_state   idle / charging / unmetered / battery, from Linux or from a script
    eligibility    the pure "may this device train now?" policy (Gboard's conditions)
    scheduler      runs a training job step by step, checkpointing when a condition drops
    litert_model   the trainable TFLite model in LiteRT, its weights by manifest name
    trainer        one round's local training: windows, steps, Δ = local − global, clipping
    client         the HTTP client: enroll, check in, download, upload with retries
    model_store    downloaded model versions: verify, swap atomically, keep one for rollback
    version_check  is a downloaded version complete and consistent (asked before activation)
    bounds         the device's own limits on what a server may send or ask
    suggester      top-3 next words, served while training and across model swaps
    device         the device loop that ties them together (`fedkb device`)

Imports are allowed from numpy, sentencepiece, requests, safetensors, ai-edge-litert, cryptography
and the TF-free parts of `fedkb` and `datasets` only; a test walks this package to enforce it.

Embedding guide (mobile engineers)
----------------------------------
A keyboard app needs one `Device` with a home folder, a `DeviceStateProvider` that asks the
platform, a background thread for the federated cycles, and `Device.suggest` on each keystroke.
The hooks `screen_off`, `plugged_in`, `on_wifi`, `battery_percent` and the names in capitals are
the app's; everything else below runs as written (tests/test_edge_embedding_example.py executes
these steps against a real server)::

    # 1. At app start: the device, with the platform's view of its state.
    import threading

    from edge_runtime.device import Device, DeviceConfig
    from edge_runtime.device_state import DeviceState, DeviceStateProvider

    class PhoneState(DeviceStateProvider):  # Android: PowerManager, BatteryManager, ConnectivityManager
        def current(self) -> DeviceState:  # keep it cheap: asked before every training step
            return DeviceState(idle=screen_off(), charging=plugged_in(), unmetered=on_wifi(),
                               battery=battery_percent())

    # Ship the fleet's model signing key with the app and pass it as
    # DeviceConfig(..., trusted_keys=TrustedKeys.from_files([KEY_FILE])) (fedkb_core.signing);
    # without it the device pins the server's key when it enrolls.
    device = Device(DeviceConfig(server_url=SERVER_URL, home=APP_FILES / "fedkb"), state=PhoneState())
    device.ensure_enrolled(ENROLLMENT_SECRET)  # enrolls on first run (ServerUnavailable offline: try
                                               # later); the token stays in home/credentials.json

    # 2. Each message the user sends: kept in home/examples.sqlite, never uploaded.
    for message in SENT_MESSAGES:
        device.examples.add(message)

    # 3. The federated cycles on a background thread: check in, fetch new model versions, train
    #    only while idle, charging and unmetered, upload the clipped update. An unreachable
    #    server, a refusal or a rejected model is logged, reported and retried after the poll
    #    interval; the thread runs until `stop` is set.
    stop = threading.Event()
    worker = threading.Thread(target=device.run, kwargs={"stop": stop}, daemon=True)
    worker.start()

    # 4. On each keystroke, from the UI thread: the top-3 next words from the current version
    #    ([] until the first version is installed). They follow every model swap.
    words = device.suggest("to be or not to")
    device.suggester.reset()  # when a new text field opens

    # 5. At shutdown (the current cycle finishes first).
    stop.set()
    worker.join()
    device.close()
"""
