// pm2 ecosystem for a BISTRO validator and miner: `pm2 start deploy/pm2/ecosystem.config.js`
// (`--only bistro-validator` or `--only bistro-miner` for one). Everything comes from the
// environment of the `pm2 start` command, so one file serves any machine:
//
//   BISTRO_BIN            the bistro command (default: bistro on PATH)
//   BISTRO_PYTHON         instead of BISTRO_BIN: run `$BISTRO_PYTHON -m bistro.cli`
//   BISTRO_CONFIG         a settings file (TOML/JSON) both nodes read (optional)
//   BISTRO_VALIDATOR_WALLET, BISTRO_MINER_WALLET   wallet names (default: validator, miner)
//   BISTRO_HOTKEY         hotkey name (default: default)
//   BISTRO_VALIDATOR_DIR, BISTRO_MINER_DIR         working directories (state, logs)
//   BISTRO_VALIDATOR_METRICS_PORT, BISTRO_MINER_METRICS_PORT   Prometheus ports (default 9100, 9101)
//   BISTRO_ARGS           more flags for both, e.g. "--subtensor.network test --netuid 212 --storage s3"
//   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY       write keys of your bucket (S3 storage)
//
// SIGINT on stop: the node finishes its window and saves its state; kill_timeout gives it time.
const env = process.env;
const split = (s) => (s || "").split(/\s+/).filter(Boolean);

function node(role, wallet, dir, port) {
  const bistro = env.BISTRO_PYTHON
    ? { script: env.BISTRO_PYTHON, prefix: ["-m", "bistro.cli"] }
    : { script: env.BISTRO_BIN || "bistro", prefix: [] };
  const args = [...bistro.prefix, role, "--wallet.name", wallet, "--wallet.hotkey", env.BISTRO_HOTKEY || "default",
    "--dir", dir, "--metrics.port", String(port), "--logging.json"];
  if (env.BISTRO_CONFIG) args.push("--config", env.BISTRO_CONFIG);
  args.push(...split(env.BISTRO_ARGS));
  const passed = {};
  for (const key of ["PATH", "HOME", "PYTHONPATH", "HF_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"]) {
    if (env[key]) passed[key] = env[key];
  }
  return {
    name: `bistro-${role}`,
    script: bistro.script,
    args,
    interpreter: "none",
    cwd: env.BISTRO_CWD || process.cwd(),
    autorestart: true,
    restart_delay: 2000,
    max_restarts: 50,
    min_uptime: "30s",
    kill_timeout: 120000,
    merge_logs: true,
    time: false, // --logging.json lines carry their own time
    env: { ...passed, PYTHONUNBUFFERED: "1", OMP_NUM_THREADS: env.OMP_NUM_THREADS || "1", TOKENIZERS_PARALLELISM: "false" },
  };
}

module.exports = {
  apps: [
    node("validator", env.BISTRO_VALIDATOR_WALLET || "validator", env.BISTRO_VALIDATOR_DIR || "bistro-validator",
      env.BISTRO_VALIDATOR_METRICS_PORT || 9100),
    node("miner", env.BISTRO_MINER_WALLET || "miner", env.BISTRO_MINER_DIR || "bistro-miner",
      env.BISTRO_MINER_METRICS_PORT || 9101),
  ],
};
