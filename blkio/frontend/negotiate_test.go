package frontend

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtblk/virtblk/blkio/vhostuser/wire"
)

// scriptedBackend answers front-end requests with reply(m); a nil reply
// payload with ok=false means "send nothing".
func scriptedBackend(t *testing.T, reply func(m wire.Message) (wire.Request, []byte, bool)) *net.UnixConn {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sock")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	front, back := conn(fds[0]), conn(fds[1])
	bc := wire.NewConn(back)
	go func() {
		defer bc.Close()
		for {
			m, err := bc.Recv()
			if err != nil {
				return
			}
			m.CloseFDs()
			req, p, ok := reply(m)
			if ok {
				bc.SendReply(req, p)
			} else if m.NeedReply() {
				bc.SendReply(m.Request, wire.AppendU64(nil, 0))
			}
		}
	}()
	return front
}

// goodFeatures answers GET_* like a minimal, valid back-end.
func goodReply(m wire.Message) (wire.Request, []byte, bool) {
	switch m.Request {
	case wire.GetFeatures:
		return m.Request, wire.AppendU64(nil, FeatureVersion1|wire.FeatureProtocolFeatures|FeatureBlkFlush), true
	case wire.GetProtocolFeatures:
		return m.Request, wire.AppendU64(nil, wire.ProtoConfig|wire.ProtoReplyAck|wire.ProtoMQ), true
	case wire.GetQueueNum:
		return m.Request, wire.AppendU64(nil, 1), true
	case wire.GetConfig:
		cfg := make([]byte, configReadSize)
		cfg[0] = 8 // 8 sectors
		return m.Request, wire.Config{Data: cfg}.Append(nil), true
	case wire.GetVringBase:
		return m.Request, wire.VringState{}.Append(nil), true
	}
	return 0, nil, false
}

func TestNegotiateAgainstScriptedBackend(t *testing.T) {
	ctx := context.Background()
	dev, err := Start(ctx, scriptedBackend(t, goodReply), Options{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if dev.Info().Capacity != 4096 || !dev.Info().Flush || dev.Info().MaxQueues != 1 {
		t.Fatalf("%+v", dev.Info())
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestNegotiateRejectsBadBackends(t *testing.T) {
	cases := []struct {
		name  string
		patch func(m wire.Message) (wire.Request, []byte, bool)
		want  string
	}{
		{"no-version-1", func(m wire.Message) (wire.Request, []byte, bool) {
			if m.Request == wire.GetFeatures {
				return m.Request, wire.AppendU64(nil, wire.FeatureProtocolFeatures), true
			}
			return goodReply(m)
		}, "VERSION_1"},
		{"no-config", func(m wire.Message) (wire.Request, []byte, bool) {
			if m.Request == wire.GetProtocolFeatures {
				return m.Request, wire.AppendU64(nil, wire.ProtoMQ), true
			}
			return goodReply(m)
		}, "CONFIG"},
		{"wrong-reply-code", func(m wire.Message) (wire.Request, []byte, bool) {
			if m.Request == wire.GetQueueNum {
				return wire.GetFeatures, wire.AppendU64(nil, 1), true
			}
			return goodReply(m)
		}, "GET_QUEUE_NUM"},
		{"too-few-queues", func(m wire.Message) (wire.Request, []byte, bool) {
			if m.Request == wire.GetQueueNum {
				return m.Request, wire.AppendU64(nil, 0), true
			}
			return goodReply(m)
		}, "queues"},
		{"short-config", func(m wire.Message) (wire.Request, []byte, bool) {
			if m.Request == wire.GetConfig {
				return m.Request, wire.Config{Data: make([]byte, 8)}.Append(nil), true
			}
			return goodReply(m)
		}, "GET_CONFIG"},
		{"nack", func(m wire.Message) (wire.Request, []byte, bool) {
			if m.Request == wire.SetMemTable {
				return m.Request, wire.AppendU64(nil, 1), true
			}
			return goodReply(m)
		}, "refused SET_MEM_TABLE"},
		{"silent", func(m wire.Message) (wire.Request, []byte, bool) {
			if m.Request == wire.GetConfig {
				return 0, nil, false // never answers: must time out
			}
			return goodReply(m)
		}, "timeout"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dev, err := Start(context.Background(), scriptedBackend(t, tc.patch), Options{Timeout: 300 * time.Millisecond})
			if err == nil {
				dev.Close()
				t.Fatal("bad back-end accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}
