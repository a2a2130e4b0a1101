// line_side: segment one image through the SAA+ C ABI, as an inspection-line program would.
//
//   g++ -O2 -std=c++17 examples/line_side.cpp $(python -m runtime.capi --cflags --libs) -o line_side
//   ./line_side engines/ --dataset mtd --category mtd part.ppm part_map.npy
//   ./line_side engines/ --config my_part.yaml part.pgm part_map.npy
//   ./line_side engines/ --dataset mtd --category mtd --calibration cal.json --mask part_mask.pgm part.ppm part_map.npy
//
// Line-side settings (saa_open_ex): --calibration FILE, --memory FILE, --image-threshold T,
// --pixel-threshold T, --threads N, --settings "key=value,..." (engine settings, e.g.
// "cuda_graphs=on,overlap=on"; docs/configuration.md). With an image threshold the decision (OK / NG and the
// score) goes to stderr; with a pixel threshold --mask OUT.pgm writes the defect mask (0/255).
// Reads binary PPM (P6) or PGM (P5), 8 or 16 bit, with a reader of its own so that it builds
// with nothing but the C++ standard library; other formats through OpenCV's C++ API when built
// with -DSAA_WITH_OPENCV $(pkg-config --cflags --libs opencv4). Writes the anomaly map at the
// image's size as a float32 .npy and prints the regions as JSON lines on stdout.
// Exit status: 0 done, 1 the ABI reported a failure, 2 bad command line or unreadable files.
#include "saa.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef SAA_WITH_OPENCV
#include <opencv2/imgcodecs.hpp>
#endif

namespace {

// A frame as a camera SDK hands it: rows of `stride` bytes, BGR (3) or gray (1) pixels.
struct Frame {
    int height = 0, width = 0, channels = 0, stride = 0;
    std::vector<uint8_t> pixels;
};

// Next header token of a PNM file, skipping whitespace and # comments.
bool pnm_token(std::istream &in, std::string &token) {
    token.clear();
    int c;
    while ((c = in.get()) != EOF) {
        if (c == '#') {
            while ((c = in.get()) != EOF && c != '\n') {
            }
        } else if (!std::isspace(c)) {
            token.push_back(static_cast<char>(c));
            break;
        }
    }
    while ((c = in.peek()) != EOF && !std::isspace(c) && c != '#')
        token.push_back(static_cast<char>(in.get()));
    return !token.empty();
}

bool positive_int(const std::string &text, int limit, int &value) {
    if (text.empty() || text.size() > 9 || text.find_first_not_of("0123456789") != std::string::npos)
        return false;
    value = std::stoi(text);
    return value >= 1 && value <= limit;
}

// Binary PGM (P5) or PPM (P6), maxval 255 or 65535 (16-bit keeps its high byte, as the
// Python runtime does). PPM's RGB is swapped to the BGR the ABI takes.
bool read_pnm(const std::string &path, Frame &frame, std::string &error) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        return error = path + ": cannot open", false;
    std::string magic, w, h, m;
    if (!pnm_token(in, magic) || (magic != "P5" && magic != "P6"))
        return error = path + ": not a binary PGM (P5) or PPM (P6) file", false;
    int width, height, maxval;
    if (!pnm_token(in, w) || !pnm_token(in, h) || !pnm_token(in, m) || !positive_int(w, 1 << 20, width) ||
        !positive_int(h, 1 << 20, height) || !positive_int(m, 65535, maxval))
        return error = path + ": bad PNM header (width, height or maxval)", false;
    if (maxval != 255 && maxval != 65535)
        return error = path + ": maxval " + m + " is not supported (255 or 65535)", false;
    in.get(); // the single whitespace byte that ends the header
    const int channels = magic == "P6" ? 3 : 1, bytes = maxval > 255 ? 2 : 1;
    std::vector<uint8_t> raw(static_cast<size_t>(width) * height * channels * bytes);
    if (!in.read(reinterpret_cast<char *>(raw.data()), static_cast<std::streamsize>(raw.size())))
        return error = path + ": truncated pixel data", false;
    frame.height = height;
    frame.width = width;
    frame.channels = channels;
    frame.stride = width * channels;
    frame.pixels.resize(static_cast<size_t>(width) * height * channels);
    for (size_t i = 0; i < frame.pixels.size(); ++i)
        frame.pixels[i] = raw[i * bytes]; // 16-bit PNM is big-endian: the first byte is the high one
    if (channels == 3)
        for (size_t i = 0; i < frame.pixels.size(); i += 3)
            std::swap(frame.pixels[i], frame.pixels[i + 2]);
    return true;
}

bool read_image(const std::string &path, Frame &frame, std::string &error) {
    std::ifstream probe(path, std::ios::binary);
    if (!probe)
        return error = path + ": cannot open", false;
    char magic[2] = {0, 0};
    probe.read(magic, 2);
    if (probe && magic[0] == 'P' && (magic[1] == '5' || magic[1] == '6'))
        return read_pnm(path, frame, error);
#ifdef SAA_WITH_OPENCV
    cv::Mat image = cv::imread(path, cv::IMREAD_UNCHANGED);
    if (image.empty())
        return error = path + ": OpenCV cannot read it", false;
    if (image.depth() == CV_16U)
        image.convertTo(image, CV_8U, 1.0 / 256.0);
    if (image.depth() != CV_8U || (image.channels() != 1 && image.channels() != 3 && image.channels() != 4))
        return error = path + ": unsupported pixel type", false;
    frame.height = image.rows;
    frame.width = image.cols;
    frame.channels = image.channels();
    frame.stride = static_cast<int>(image.step[0]); // OpenCV rows may be padded: the ABI takes the stride
    frame.pixels.assign(image.data, image.data + image.step[0] * image.rows);
    return true;
#else
    return error = path + ": only binary PPM/PGM are read (build with -DSAA_WITH_OPENCV for other formats)", false;
#endif
}

bool write_mask_pgm(const std::string &path, const std::vector<uint8_t> &mask, int height, int width) {
    std::ofstream out(path, std::ios::binary);
    out << "P5\n" << width << " " << height << "\n255\n";
    for (const uint8_t value : mask)
        out.put(value ? static_cast<char>(255) : static_cast<char>(0));
    return static_cast<bool>(out);
}

bool write_npy(const std::string &path, const std::vector<float> &values, int height, int width) {
    const uint16_t probe = 1;
    const bool little = *reinterpret_cast<const uint8_t *>(&probe) == 1;
    std::ostringstream dict;
    dict << "{'descr': '" << (little ? '<' : '>') << "f4', 'fortran_order': False, 'shape': (" << height << ", "
         << width << "), }";
    std::string header = dict.str();
    const size_t preamble = 10; // magic (6) + version (2) + header length (2)
    header.append(63 - (preamble + header.size()) % 64, ' ');
    header.push_back('\n'); // data starts 64-byte aligned, as numpy writes it
    std::ofstream out(path, std::ios::binary);
    const uint16_t length = static_cast<uint16_t>(header.size());
    const char lengthBytes[2] = {static_cast<char>(length & 0xff), static_cast<char>(length >> 8)};
    out.write("\x93NUMPY\x01\x00", 8);
    out.write(lengthBytes, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char *>(values.data()),
              static_cast<std::streamsize>(values.size() * sizeof(float)));
    return static_cast<bool>(out);
}

std::string json_string(const char *text) {
    std::string out = "\"";
    for (const char *c = text; *c; ++c) {
        const unsigned char u = static_cast<unsigned char>(*c);
        if (*c == '"' || *c == '\\') {
            out += '\\';
            out += *c;
        } else if (u < 0x20) {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\u%04x", u);
            out += escaped;
        } else {
            out += *c;
        }
    }
    return out + "\"";
}

std::string region_json(const saa_region &r) {
    char numbers[256];
    std::snprintf(numbers, sizeof numbers,
                  "{\"box\": [%.9g, %.9g, %.9g, %.9g], \"score\": %.9g, \"mask_area\": %d, \"prompt_index\": %d, "
                  "\"in_top_k\": %s, \"phrase\": ",
                  r.x0, r.y0, r.x1, r.y1, r.score, r.mask_area, r.prompt_index, r.in_top_k ? "true" : "false");
    return numbers + json_string(r.phrase) + "}";
}

int usage() {
    std::cerr << "usage: line_side ENGINE_DIR (--dataset D --category C | --config FILE) IMAGE OUT.npy "
                 "[--device cpu|cuda] [--threads N] [--calibration FILE] [--memory FILE] [--image-threshold T] "
                 "[--pixel-threshold T] [--mask OUT.pgm] [--settings key=value,...]\n";
    return 2;
}

} // namespace

int main(int argc, char **argv) {
    std::string dataset, category, config, device = "cpu", calibration, memory, image_threshold, pixel_threshold,
        threads, mask_path, settings;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        std::string *option = arg == "--dataset"         ? &dataset         : arg == "--category"        ? &category
                            : arg == "--config"          ? &config          : arg == "--device"          ? &device
                            : arg == "--calibration"     ? &calibration     : arg == "--memory"          ? &memory
                            : arg == "--image-threshold" ? &image_threshold : arg == "--pixel-threshold" ? &pixel_threshold
                            : arg == "--threads"         ? &threads         : arg == "--mask"            ? &mask_path
                            : arg == "--settings"        ? &settings        : nullptr;
        if (option) {
            if (++i >= argc)
                return usage();
            *option = argv[i];
        } else if (arg.rfind("--", 0) == 0) {
            return usage();
        } else {
            positional.push_back(arg);
        }
    }
    if (positional.size() != 3 || config.empty() == (dataset.empty() || category.empty()))
        return usage();
    const std::string engine_dir = positional[0], image_path = positional[1], out_path = positional[2];
    const std::string prompt = config.empty() ? dataset + "/" + category : config;

    if (saa_abi_version() != SAA_ABI_VERSION) {
        std::cerr << "line_side: library speaks C ABI " << saa_abi_version() << ", saa.h " << SAA_ABI_VERSION << "\n";
        return 1;
    }
    Frame frame;
    std::string error;
    if (!read_image(image_path, frame, error)) {
        std::cerr << "line_side: " << error << "\n";
        return 2;
    }
    saa_open_options options;
    saa_open_options_init(&options); // struct_size and the defaults: no calibration, no memory, NAN thresholds
    options.device = device.c_str();
    options.calibration = calibration.empty() ? nullptr : calibration.c_str();
    options.memory = memory.empty() ? nullptr : memory.c_str();
    options.settings = settings.empty() ? nullptr : settings.c_str();
    try {
        if (!threads.empty())
            options.threads = std::stoi(threads);
        if (!image_threshold.empty())
            options.image_threshold = std::stod(image_threshold);
        if (!pixel_threshold.empty())
            options.pixel_threshold = std::stod(pixel_threshold);
    } catch (const std::exception &) {
        return usage();
    }
    saa_pipeline *pipe = nullptr;
    if (saa_open_ex(engine_dir.c_str(), prompt.c_str(), &options, &pipe) != SAA_OK) {
        std::cerr << "line_side: " << saa_last_error(nullptr) << "\n";
        return 1;
    }
    std::vector<float> map(static_cast<size_t>(frame.height) * frame.width);
    std::vector<saa_region> regions(256);
    int count = 0;
    const int status = saa_infer(pipe, frame.pixels.data(), frame.height, frame.width, frame.stride, frame.channels,
                                 map.data(), frame.height, frame.width, regions.data(),
                                 static_cast<int>(regions.size()), &count);
    if (status != SAA_OK) {
        std::cerr << "line_side: " << saa_last_error(pipe) << "\n";
        saa_close(pipe);
        return 1;
    }
    float score = 0.0f;
    int label = -1;
    if (saa_last_decision(pipe, &score, &label) == SAA_OK && label >= 0)
        std::cerr << "line_side: " << (label ? "NG" : "OK") << " (score " << score << ")\n";
    if (!mask_path.empty()) {
        std::vector<uint8_t> mask(map.size());
        if (saa_last_mask(pipe, mask.data(), frame.height, frame.width) != SAA_OK) {
            std::cerr << "line_side: " << saa_last_error(pipe) << "\n";
            saa_close(pipe);
            return 1;
        }
        if (!write_mask_pgm(mask_path, mask, frame.height, frame.width)) {
            std::cerr << "line_side: cannot write " << mask_path << "\n";
            saa_close(pipe);
            return 2;
        }
    }
    saa_close(pipe);
    if (!write_npy(out_path, map, frame.height, frame.width)) {
        std::cerr << "line_side: cannot write " << out_path << "\n";
        return 2;
    }
    for (int i = 0; i < count; ++i)
        std::cout << region_json(regions[i]) << "\n";
    return 0;
}
