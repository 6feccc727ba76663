// Reference server for the benchmarks: the seed's stack, Node + Socket.IO 4, doing the
// same fan-out the idiomatic way (rooms, io.to(room).emit encodes a packet once).
// Events: `event` with kaldrix's envelope (channel, offset, timestamp with microseconds);
// `subscribe` and `publish` are acknowledged with an `ack` event. Run by bench/compare.py
// with socket.io installed from npm into a temporary directory; not part of kaldrix.
//
//     NODE_PATH=<tmp>/node_modules node bench/peers/socketio_server.js PORT

const { Server } = require("socket.io");
const { performance } = require("perf_hooks");

const port = Number(process.argv[2] || 3000);
const epoch = "peer-socketio";
const offsets = new Map();
let ids = 0;

function now() {
  const micros = Math.floor((performance.timeOrigin + performance.now()) * 1000);
  const seconds = new Date(Math.floor(micros / 1000)).toISOString().slice(0, 19);
  return `${seconds}.${String(micros % 1000000).padStart(6, "0")}Z`;
}

const io = new Server(port, { transports: ["websocket"], serveClient: false, perMessageDeflate: false });

io.on("connection", (socket) => {
  socket.on("subscribe", (msg) => {
    const channels = {};
    for (const channel of msg.channels) {
      socket.join(channel);
      channels[channel] = { offset: offsets.get(channel) || 0, epoch, recovered: false, replayed: 0 };
    }
    socket.emit("ack", { ref: msg.id, channels });
  });
  socket.on("publish", (msg) => {
    const results = [];
    for (const event of msg.events) {
      const offset = (offsets.get(msg.channel) || 0) + 1;
      offsets.set(msg.channel, offset);
      const id = event.id || `e${++ids}`;
      io.to(msg.channel).emit("event", {
        type: event.type, payload: event.payload, timestamp: now(), id,
        version: "1.0.0", channel: msg.channel, offset, epoch,
      });
      results.push({ id, offsets: { [msg.channel]: offset } });
    }
    socket.emit("ack", { ref: msg.id, results });
  });
});
