// Package logging builds the slog logger the binaries use and routes klog and
// controller-runtime's logr into it, so every line comes out in one format.
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/go-logr/logr"
	"k8s.io/klog/v2"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
)

// New returns a logger writing to w in format "text" or "json" at level
// "debug", "info", "warn" or "error", and makes it klog's and controller-runtime's sink.
func New(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	var h slog.Handler
	switch strings.ToLower(format) {
	case "text":
		h = slog.NewTextHandler(w, opts)
	case "json":
		h = slog.NewJSONHandler(w, opts)
	default:
		return nil, fmt.Errorf("log format %q: want text or json", format)
	}
	log := slog.New(h)
	klog.SetSlogLogger(log)
	ctrllog.SetLogger(logr.FromSlogHandler(h))
	return log, nil
}
