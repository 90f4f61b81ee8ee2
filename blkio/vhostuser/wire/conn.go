package wire

import (
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// Message is one received message. FDs are owned by the receiver, which must
// close every one it does not keep (CloseFDs).
type Message struct {
	Header
	Payload []byte
	FDs     []int
}

// CloseFDs closes every descriptor still attached to m and forgets them.
func (m *Message) CloseFDs() {
	for _, fd := range m.FDs {
		unix.Close(fd)
	}
	m.FDs = nil
}

// TakeFD detaches and returns the single fd of m. It fails (and closes all
// fds) unless exactly one is attached, because a request that carries one fd
// and arrives with more is a confused or hostile peer.
func (m *Message) TakeFD() (int, error) {
	if len(m.FDs) != 1 {
		n := len(m.FDs)
		m.CloseFDs()
		return -1, fmt.Errorf("%w: %v carries %d file descriptors, want 1", ErrMalformed, m.Request, n)
	}
	fd := m.FDs[0]
	m.FDs = nil
	return fd, nil
}

// Conn frames vhost-user messages on a unix stream socket. It is not safe for
// concurrent use: one goroutine owns a connection's request/reply sequence.
type Conn struct {
	uc  *net.UnixConn
	hdr [HeaderSize]byte
	oob []byte
	out []byte
}

// NewConn wraps an established unix stream connection.
func NewConn(uc *net.UnixConn) *Conn {
	return &Conn{uc: uc, oob: make([]byte, unix.CmsgSpace(MaxFDs*4))}
}

// Close closes the socket.
func (c *Conn) Close() error { return c.uc.Close() }

// UnixConn returns the underlying socket.
func (c *Conn) UnixConn() *net.UnixConn { return c.uc }

// ErrClosed is returned by Recv when the peer closed the connection cleanly
// between messages.
var ErrClosed = errors.New("vhost-user peer closed the connection")

// Recv reads one message and the file descriptors attached to it.
func (c *Conn) Recv() (Message, error) {
	var fds []int
	fail := func(err error) (Message, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return Message{}, err
	}
	// Ancillary data travels with the first byte of the sender's sendmsg, so
	// collect it from every read until the message is complete.
	read := func(buf []byte, first bool) error {
		for got := 0; got < len(buf); {
			n, oobn, flags, _, err := c.uc.ReadMsgUnix(buf[got:], c.oob)
			if oobn > 0 {
				more, perr := parseRights(c.oob[:oobn])
				fds = append(fds, more...)
				if perr != nil {
					return perr
				}
			}
			if flags&unix.MSG_CTRUNC != 0 {
				return fmt.Errorf("%w: more than %d file descriptors attached", ErrMalformed, MaxFDs)
			}
			got += n
			if err != nil {
				if errors.Is(err, io.EOF) {
					if got == 0 && first {
						return ErrClosed
					}
					return io.ErrUnexpectedEOF
				}
				return err
			}
			if n == 0 && oobn == 0 {
				if got == 0 && first {
					return ErrClosed
				}
				return io.ErrUnexpectedEOF
			}
		}
		return nil
	}
	if err := read(c.hdr[:], true); err != nil {
		return fail(err)
	}
	h, err := DecodeHeader(c.hdr[:])
	if err != nil {
		return fail(err)
	}
	m := Message{Header: h}
	if h.Size > 0 {
		m.Payload = make([]byte, h.Size)
		if err := read(m.Payload, false); err != nil {
			return fail(fmt.Errorf("read %v payload: %w", h.Request, err))
		}
	}
	if len(fds) > MaxFDs {
		return fail(fmt.Errorf("%w: %d file descriptors attached, limit %d", ErrMalformed, len(fds), MaxFDs))
	}
	m.FDs = fds
	return m, nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("%w: control message: %v", ErrMalformed, err)
	}
	var fds []int
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&msgs[i])
		fds = append(fds, got...)
		if err != nil {
			return fds, fmt.Errorf("%w: SCM_RIGHTS: %v", ErrMalformed, err)
		}
	}
	return fds, nil
}

// Send writes one message with its header, payload and fds in a single
// sendmsg. h.Size is set from len(payload).
func (c *Conn) Send(h Header, payload []byte, fds []int) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("send %v: payload %d bytes exceeds %d", h.Request, len(payload), MaxPayload)
	}
	h.Size = uint32(len(payload))
	c.out = append(c.out[:0], make([]byte, HeaderSize)...)
	h.Put(c.out)
	c.out = append(c.out, payload...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.uc.WriteMsgUnix(c.out, oob, nil)
	if err != nil {
		return fmt.Errorf("send %v: %w", h.Request, err)
	}
	if n != len(c.out) {
		return fmt.Errorf("send %v: short write %d of %d bytes", h.Request, n, len(c.out))
	}
	return nil
}

// SendRequest sends a front-end request; needReply sets NEED_REPLY.
func (c *Conn) SendRequest(req Request, needReply bool, payload []byte, fds ...int) error {
	f := FlagVersion
	if needReply {
		f |= FlagNeedReply
	}
	return c.Send(Header{Request: req, Flags: f}, payload, fds)
}

// SendReply sends a back-end reply to req.
func (c *Conn) SendReply(req Request, payload []byte, fds ...int) error {
	return c.Send(Header{Request: req, Flags: FlagVersion | FlagReply}, payload, fds)
}

// RecvReply reads the reply to req and checks that it is one.
func (c *Conn) RecvReply(req Request) (Message, error) {
	m, err := c.Recv()
	if err != nil {
		return m, fmt.Errorf("reply to %v: %w", req, err)
	}
	if !m.IsReply() || m.Request != req {
		m.CloseFDs()
		return Message{}, fmt.Errorf("%w: waiting for reply to %v, got %v flags %#x", ErrMalformed, req, m.Request, m.Flags)
	}
	return m, nil
}
