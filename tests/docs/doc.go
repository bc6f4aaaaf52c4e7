// Package docs tests that the documentation names only what exists: every meshcrypt and
// meshcrypt-agent command line of README.md and docs/*.md, in fenced code blocks and in
// inline code (also as `kubectl meshcrypt`, kubectl-meshcrypt, bin/meshcrypt, or after
// kubectl exec's --), is run with --help against the real binaries, which refuse an unknown
// command, flag or flag value; positional words must be the command's path or arguments its
// usage line shows. Every `make` target named must be a target of the Makefile.
//
// A command that is documented before it exists must be marked outside code blocks: inline
// code in a paragraph, list item or table row that says "planned" is listed in the test log,
// not run. Code blocks are always run.
//
// The binaries come from $MESHCRYPT_BIN_DIR when set (as `make test` does), else from a fresh
// build.
package docs
