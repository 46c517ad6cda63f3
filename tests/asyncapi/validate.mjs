// Validates an AsyncAPI document read from standard input with the official parser
// (@asyncapi/parser). Prints each diagnostic as `severity code path: message`, errors
// on stdout and the rest on stderr. Exit code: 0 valid, 1 invalid, 3 parser missing
// (run `npm install` in this directory).
let Parser;
try {
  ({ Parser } = await import('@asyncapi/parser'));
} catch (error) {
  console.error(`cannot load @asyncapi/parser: ${error.message}`);
  process.exit(3);
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const document = Buffer.concat(chunks).toString('utf8');

const severities = ['error', 'warning', 'info', 'hint'];
const diagnostics = await new Parser().validate(document);
let errors = 0;
for (const d of diagnostics) {
  const severity = severities[d.severity] ?? String(d.severity);
  const line = `${severity} ${d.code} ${(d.path ?? []).join('/')}: ${d.message}`;
  if (d.severity === 0) {
    errors += 1;
    console.log(line);
  } else {
    console.error(line);
  }
}
process.exit(errors > 0 ? 1 : 0);
