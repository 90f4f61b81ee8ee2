// Command virtblk is the virtblk operator tool: it benchmarks back-ends and
// manages block stores (volumes, snapshots, clones, fsck, import, stats).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `usage: virtblk COMMAND [flags]

commands:
  demo                           both halves of virtblk on this machine, no cluster
  bench                          load-test a back-end or raw file
  store create                   create a block store
  volume create|list|delete|resize
  snapshot create|list|delete
  clone                          writable volume from a snapshot
  fsck                           verify every checksum (exit 0 only when clean)
  import                         copy a raw image into a new volume
  stats                          store counters and usage

Run "virtblk COMMAND -h" for a command's flags.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches a subcommand and returns the exit code: 0 success, 1
// failure, 2 bad usage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "demo":
		err = runDemo(ctx, args[1:], stdout, stderr)
	case "bench":
		err = runBench(ctx, args[1:], stdout, stderr)
	case "store":
		if len(args) < 2 || args[1] != "create" {
			err = errUsage{"store: the only action is create"}
		} else {
			err = runStoreCreate(args[2:], stdout, stderr)
		}
	case "volume":
		err = runVolume(args[1:], stdout, stderr)
	case "snapshot":
		err = runSnapshot(args[1:], stdout, stderr)
	case "clone":
		err = runClone(args[1:], stdout, stderr)
	case "fsck":
		err = runFsck(args[1:], stdout, stderr)
	case "import":
		err = runImport(ctx, args[1:], stdout, stderr)
	case "stats":
		err = runStats(args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		err = errUsage{fmt.Sprintf("unknown command %q", args[0])}
	}
	var ue errUsage
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUnclean):
		return 1
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "virtblk:", err)
		fmt.Fprint(stderr, usage)
		return 2
	default:
		fmt.Fprintln(stderr, "virtblk:", err)
		return 1
	}
}
