// Package benchplot draws the benchmark plots of docs/performance.md as small, self-contained
// SVG documents: line charts (a value against N, optionally on a logarithmic x axis) and bar
// charts (one value per mode). It is written with fmt and strings only, so the benchmarks
// that call it add no dependency to the module.
//
// It is a leaf: it imports nothing of meshcrypt and nothing outside the standard library.
package benchplot
